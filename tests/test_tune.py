"""tune/sweep.py and tune/scaling.py on the shared local Ray session, tiny configs."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitlm.config import DataConfig, from_dict
from bitlm.schedules import compress_probability, sequence_length
from bitlm.sweep_config import SweepConfig
from pipelines.prepare_data import prepare

ROOT = Path(__file__).resolve().parent.parent
BASE = [
    "data.window_bytes=16", "train.max_seconds=null", "train.eval_every=4", "train.log_every=4",
    "run.num_workers=1", "run.checkpoint_every=4", "model.num_layers=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune_shards")
    prepare(DataConfig(window_bytes=16), None, str(out))
    return str(out)


def _sweep(tmp_path, **fields) -> SweepConfig:
    base = {"name": "t", "base": "configs/tiny.yaml", "storage_path": str(tmp_path / "tune"), "cpus_per_trial": 0.5}
    return from_dict(SweepConfig, {**base, **fields})


def _children(client, parent):
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_asha_sweep_stops_weak_trials_and_returns_cpus(tmp_path, data_dir, mlflow_uri, ray_session):
    from mlflow.tracking import MlflowClient

    from tune import sweep as sweep_mod

    # Strong rates first: ASHA stops a trial only against results already recorded at its rung,
    # so the weak trials, which start when a strong one has finished or stopped, meet a record
    # to lose to whatever order the two concurrent trials report in.
    sweep = _sweep(
        tmp_path,
        space={"train.lr": {"type": "grid", "values": [0.02, 0.01, 0.00001, 0.00003]}},
        scheduler={"type": "asha", "max_t": 24, "grace_period": 4, "reduction_factor": 2},
        num_samples=1,
        max_concurrent_trials=2,
    )
    out = sweep_mod.run_sweep(
        sweep, name="asha", base_overrides=[*BASE, "train.max_steps=24", f"data.output_dir={data_dir}"]
    )
    rows = out["rows"]
    assert len(rows) == 4
    assert any(r["status"] == "stopped early" for r in rows), rows
    assert all(r["status"] != "error" for r in rows)
    assert rows[0]["params"]["train.lr"] in (0.01, 0.02)  # the sorted table puts the best first
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.params["scheduler"] == "asha" and "train.lr" in parent.data.params["space"]
    assert parent.data.tags["best_trial"] == rows[0]["trial"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "results.md",
        "results.json",
        "val_bpb_by_step.png",
    }
    children = _children(client, out["parent_run_id"])
    assert len(children) == 4
    for child in children:
        assert child.data.params["train.lr"] in {"1e-05", "3e-05", "0.01", "0.02"}
        assert len(client.get_metric_history(child.info.run_id, "val_bpb")) >= 1
        assert child.info.status == "FINISHED"
    deadline = time.time() + 60
    while (
        time.time() < deadline
        and ray_session.available_resources().get("CPU", 0) < ray_session.cluster_resources()["CPU"]
    ):
        time.sleep(1)
    assert ray_session.available_resources().get("CPU", 0) == ray_session.cluster_resources()["CPU"]


def test_scaling_scheduler_grows_a_trial_twice_preserving_bpb(tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from tune import sweep as sweep_mod

    sweep = _sweep(
        tmp_path,
        scheduler={
            "type": "scaling",
            "patience": 1,
            "min_delta": 100.0,
            "strategies": ["depth", "width"],
            "max_params": 150_000,  # 46k -> 55k (depth) -> 142k (width); the next depth (209k) is capped
        },
        num_samples=1,
        max_concurrent_trials=1,
    )
    out = sweep_mod.run_sweep(
        sweep,
        name="grow",
        base_overrides=[*BASE, "train.max_steps=60", f"data.output_dir={data_dir}", "train.lr=0.005"],
    )
    row = out["rows"][0]
    assert row["growths"] == ["depth", "width"] and row["status"] == "completed", row
    client = MlflowClient(mlflow_uri)
    run = client.get_run(row["run_id"])
    growth_tags = sorted(
        (int(k.rsplit("_", 1)[1]), v) for k, v in run.data.tags.items() if k.startswith("growth_step_")
    )
    assert [v for _, v in growth_tags] == ["depth", "width"]
    before = {m.step: m.value for m in client.get_metric_history(row["run_id"], "growth_val_bpb_before")}
    after = {m.step: m.value for m in client.get_metric_history(row["run_id"], "growth_val_bpb_after")}
    assert len(before) == 2 and before.keys() == after.keys()
    for step in before:
        assert after[step] == pytest.approx(before[step], abs=1e-4)  # growth preserves the function
    sizes = sorted(client.get_metric_history(row["run_id"], "model_params"), key=lambda m: m.step)
    assert sizes[-1].value > sizes[0].value
    last_growth = max(before)
    later = [m.value for m in client.get_metric_history(row["run_id"], "val_bpb") if m.step > last_growth]
    assert later and min(later) < after[last_growth]  # training after the growth lowers it further
    lrs = {m.step: m.value for m in client.get_metric_history(row["run_id"], "lr")}
    # growth_warmup_steps (10): the k-th step after the growth, logged as last_growth + k, runs at k/10
    ramp = [lrs[last_growth + k] for k in range(1, 11) if last_growth + k in lrs]
    assert ramp == pytest.approx([0.0005 * k for k in range(1, 11)][: len(ramp)]) and len(ramp) >= 2
    assert lrs[max(lrs)] == pytest.approx(0.005)


def test_curriculum_trials_follow_their_own_schedules(tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    from tune import sweep as sweep_mod

    sweep = _sweep(
        tmp_path,
        space={
            "train.seq_ramp_start_bytes": {"type": "grid", "values": [None, 4]},
            "train.compress_prob": {"type": "choice", "values": [0.5]},
            "train.seq_ramp_steps": {"type": "choice", "values": [12]},
            "train.compress_warmup": {"type": "choice", "values": [6]},
        },
        scheduler={"type": "fifo"},
        num_samples=1,
        max_concurrent_trials=2,
    )
    out = sweep_mod.run_sweep(
        sweep,
        name="curr",
        base_overrides=[*BASE, "train.max_steps=16", "train.log_every=1", f"data.output_dir={data_dir}"],
    )
    client = MlflowClient(mlflow_uri)
    assert len(out["rows"]) == 2
    for row in out["rows"]:
        p = row["params"]
        seq = {m.step: m.value for m in client.get_metric_history(row["run_id"], "seq_bits")}
        comp = {m.step: m.value for m in client.get_metric_history(row["run_id"], "compress_p")}
        assert sorted(seq) == list(range(1, 17))
        start = p["train.seq_ramp_start_bytes"]
        for step in seq:  # the record of step s was trained at schedule step s - 1
            assert seq[step] == sequence_length(step - 1, 144, None if start is None else 9 * start, 12)
            assert comp[step] == pytest.approx(compress_probability(step - 1, p["train.compress_prob"], 6))


def test_interrupted_sweep_resumes_and_finishes_every_trial_once(tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(
        "sweep:\n  name: resumable\n  base: configs/tiny.yaml\n"
        f"  storage_path: {tmp_path / 'tune'}\n"
        "  space: {train.lr: {type: grid, values: [0.001, 0.003]}}\n"
        "  scheduler: {type: fifo}\n  num_samples: 1\n  max_concurrent_trials: 1\n"
    )
    args = [sys.executable, "tune/sweep.py", "--config", str(sweep_file), "--name", "resumable"]
    args += [f"--set={s}" for s in [*BASE, "train.max_steps=20", f"data.output_dir={data_dir}"]]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = MlflowClient(mlflow_uri)
    deadline = time.time() + 300
    while time.time() < deadline:  # interrupt once the first trial has trained a little
        exp = client.get_experiment_by_name("bitlm")
        runs = (
            client.search_runs([exp.experiment_id], "tags.sweep = 'resumable' and tags.trial_id != ''") if exp else []
        )
        if runs and client.get_metric_history(runs[0].info.run_id, "loss"):
            break
        time.sleep(2)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=300)
    resumed = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    exp = client.get_experiment_by_name("bitlm")
    trials = client.search_runs([exp.experiment_id], "tags.sweep = 'resumable' and tags.trial_id != ''")
    assert len(trials) == 2  # every trial once: the interrupted one continued in its own run
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
        assert max(steps) == 20 and run.info.status == "FINISHED"
    assert resumed.stdout.count("| completed |") == 2
    assert not math.isnan(float(client.get_run(trials[0].info.run_id).data.metrics["val_bpb"]))
