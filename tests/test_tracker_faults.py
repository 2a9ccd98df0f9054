"""Rank 0's metric log (pipelines/tracking.MetricLog) against a real MLflow tracking server that
goes away and comes back: logging never waits or fails, what was logged meanwhile arrives, and
the account says what was delayed, dropped and lost."""

import time

from conftest import free_port, mlflow_server


def _wait(predicate, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def test_metrics_logged_while_the_tracker_is_down_arrive_when_it_returns(tmp_path):
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import MetricLog

    store, port = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    with mlflow_server(store, tmp_path / "art", port) as url:
        client = MlflowClient(url)
        run_id = client.create_run(client.create_experiment("faults")).info.run_id
        log = MetricLog(url, run_id, retry_seconds=0.2)
        log.log({"bpb": 4.0}, 0)
        log.flush()
        _wait(lambda: log.report["delivered"] == 1)
    # the server is gone: training goes on logging
    for step in range(1, 41):
        log.log({"bpb": 4.0 - step / 100}, step)
        log.flush()
    log.tag("during", "outage")
    _wait(lambda: log.report["failures"] >= 2)
    assert log.report["delivered"] == 1 and len(log.pending) == 40
    with mlflow_server(store, tmp_path / "art", port) as url:  # back, on the same store
        report = log.close(timeout=60)
        history = MlflowClient(url).get_metric_history(run_id, "bpb")
        tags = MlflowClient(url).get_run(run_id).data.tags
    assert report["lost"] == 0 and report["dropped"] == 0
    assert report["delivered"] == 41 and report["delayed"] == 40 and report["failures"] >= 2
    assert sorted(m.step for m in history) == list(range(41)) and tags["during"] == "outage"


def test_past_its_bound_the_log_drops_the_oldest_and_counts_them():
    from pipelines.tracking import MetricLog

    log = MetricLog(f"http://127.0.0.1:{free_port()}", "no-such-run", max_pending=10, retry_seconds=0.2)
    for step in range(25):
        log.log({"bpb": 1.0, "lr": 0.1}, step)
    report = log.close(timeout=1)
    assert report == {**report, "delivered": 0, "dropped": 40, "lost": 10}
    assert [m.step for _, m in log.pending] == [20, 20, 21, 21, 22, 22, 23, 23, 24, 24]  # the newest kept
