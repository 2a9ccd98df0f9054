"""pipelines/train.py and pipelines/evaluate.py: real Ray Train runs, a real MLflow store."""

import numpy as np
import pytest
import torch

from bitlm import BitTransformerLM, load_config
from bitlm.config import DataConfig, apply_overrides
from pipelines import evaluate, train
from pipelines.prepare_data import prepare

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def data_dir(ray_session, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    prepare(DataConfig(window_bytes=16), None, str(out))
    return str(out)


def _cfg(tmp_path, data_dir, **overrides):
    base = {
        "data.output_dir": data_dir,
        "data.window_bytes": 16,
        "run.storage_path": str(tmp_path / "ray"),
        "run.num_workers": 2,
        "model.num_layers": 2,
        "train.max_steps": 12,
        "train.eval_every": 6,
        "train.log_every": 2,
        "run.checkpoint_every": 6,
        "run.system_metrics_seconds": 1.0,
        "train.lr": 0.005,
    }
    return apply_overrides(load_config(ROOT / "configs" / "tiny.yaml"), {**base, **overrides})


def _history(client, run_id, key):
    return sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))


# Beyond the strategy, a setting that reaches the workers: accumulation and the direct objective
# under the pipeline (the strategy that once dropped them).
SETTINGS = {"pipeline": {"train.accum_steps": 2, "train.direct_prob": 1.0}}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "pipeline"])
def test_train_each_strategy_logs_to_mlflow(strategy, tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    out = train.run(_cfg(tmp_path, data_dir, **{"run.strategy": strategy, **SETTINGS.get(strategy, {})}))
    client = MlflowClient(mlflow_uri)
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.d_model"] == "32" and run.data.params["run.strategy"] == strategy
    assert run.data.tags["strategy"] == strategy and run.data.tags["world_size"] == "2"
    assert len(run.data.tags["git_commit"]) > 0
    loss = _history(client, out["run_id"], "loss")
    assert [m.step for m in loss][-1] == 12
    assert sum(m.value for m in loss[-3:]) < sum(m.value for m in loss[:3])  # it learns
    for key in ("K", "C", "S"):  # measured on the logged steps: the first, every log_every (2)
        history = _history(client, out["run_id"], key)
        assert [m.step for m in history] == [1, 2, 4, 6, 8, 10, 12] and all(0 <= m.value <= 1 for m in history)
    # Validation at eval_every (6, 12), and once at the first report (every Ray report carries it).
    assert [m.step for m in _history(client, out["run_id"], "val_bpb")] == [2, 6, 12]
    assert _history(client, out["run_id"], "throughput_bits_per_s")[-1].value > 0
    assert _history(client, out["run_id"], "grad_norm")[-1].value > 0
    direct = [m.value for m in _history(client, out["run_id"], "direct")]
    assert direct == [1.0 if strategy in SETTINGS else 0.0] * 12
    assert bool(_history(client, out["run_id"], "bpb")) == (strategy not in SETTINGS)  # bpb: plain batches only
    artifacts = {a.path for a in client.list_artifacts(out["run_id"])}
    assert {"checkpoint", "plots", "data", "config.yaml"} <= artifacts
    # MLflow as the comparison tool: the model-training view, system metrics, the data as an
    # input, the final checkpoint as a registered model.
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert any(k.startswith("system/cpu_utilization") for k in client.get_run(out["run_id"]).data.metrics)
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest and dataset_input.dataset.source_type == "local"
    assert out["registered"] and out["registered"].startswith("models:/bitlm-tiny/")
    local = client.download_artifacts(out["run_id"], "checkpoint", str(tmp_path / "dl"))
    model = BitTransformerLM.from_pretrained(local)
    assert model.config.num_layers == 2
    # the downloaded final checkpoint is the trained model: its val bpb is the logged one
    result = evaluate.evaluate_checkpoint(local, data_dir)
    assert result["model"]["bpb"] < 8.0 and set(result["compressors"]) == {"gzip-9", "bz2-9", "xz-9e"}
    # The platform's Ray Train settings (make_trainer) reached the run's controller: it started
    # no preemption watcher, an actor a run that only logs node drains.
    assert _actors("TrainController") and not _actors("PreemptionWatcher")


def _actors(class_name: str) -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", class_name)], limit=10_000)


def test_a_setting_the_strategy_cannot_honour_stops_the_run_before_ray(tmp_path, data_dir, mlflow_uri):
    from bitlm import ConfigError

    cfg = _cfg(tmp_path, data_dir, **{"run.strategy": "pipeline", "model.reversible": True})
    with pytest.raises(ConfigError, match="model.reversible is not supported with run.strategy=pipeline"):
        train.run(cfg)


def test_use_gpu_on_a_cluster_without_enough_gpus_fails_up_front(tmp_path, ray_session):
    from bitlm import ConfigError

    cfg = _cfg(tmp_path, str(tmp_path / "no-data"), **{"run.use_gpu": True})  # refused before data or MLflow
    with pytest.raises(ConfigError, match=r"run.use_gpu=true needs 2 GPUs .* the Ray cluster has 0"):
        train.run(cfg)
    with pytest.raises(ConfigError, match="has 1"):
        train.check_gpus(cfg, {"CPU": 16.0, "GPU": 1.0})
    train.check_gpus(cfg, {"CPU": 16.0, "GPU": 2.0})  # one per worker: it may start
    train.check_gpus(apply_overrides(cfg, {"run.use_gpu": False}), {"CPU": 4.0})


def test_worker_failure_resumes_from_last_checkpoint(tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    cfg = _cfg(
        tmp_path,
        data_dir,
        **{"run.max_failures": 1, "run.fail_at_step": 11, "run.checkpoint_every": 4, "train.log_every": 1},
    )
    out = train.run(cfg)
    assert out["metrics"]["step"] == 12
    steps = [m.step for m in _history(MlflowClient(mlflow_uri), out["run_id"], "loss")]
    redone = len(steps) - len(set(steps))
    assert redone == 3  # steps 9-11 ran twice: back to the checkpoint at 8, within the interval of 4
    assert sorted(set(steps)) == list(range(1, 13))


def test_resume_continues_in_the_same_mlflow_run(tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    first = train.run(_cfg(tmp_path, data_dir, **{"train.max_steps": 6}), name="resumable")
    second = train.run(_cfg(tmp_path, data_dir, **{"train.max_steps": 12}), name="resumable", resume=True)
    assert second["run_id"] == first["run_id"]
    loss = _history(MlflowClient(mlflow_uri), first["run_id"], "loss")
    assert [m.step for m in loss] == list(range(1, 13))  # nothing re-done, nothing skipped
    assert second["metrics"]["step"] == 12


def test_evaluate_cli_logs_baselines(tmp_path, data_dir, mlflow_uri):
    from mlflow.tracking import MlflowClient

    out = train.run(_cfg(tmp_path, data_dir, **{"train.max_steps": 4, "run.num_workers": 1}))
    by_model = evaluate.main(["--model-uri", out["registered"], "--no-mlflow"])  # the registered model
    result = evaluate.main(["--run-id", out["run_id"]])
    assert by_model["model"]["bpb"] == pytest.approx(result["model"]["bpb"])
    metrics = MlflowClient(mlflow_uri).get_run(out["run_id"]).data.metrics
    assert metrics["eval_val_bpb"] == pytest.approx(result["model"]["bpb"])
    assert metrics["baseline_xz9e_conditional_bpb"] < metrics["baseline_xz9e_bpb"]
    assert 0 < metrics["baseline_gzip9_bpb"] < 8


def test_training_windows_are_shuffled_by_seed_epoch_and_rank(data_dir):
    """Each epoch reads every window of the shard once, in an order the seed, the epoch and the
    rank decide (the same order again for a resumed epoch); data.shuffle_windows 0 reads the
    shard as it lies (a document's windows one after another)."""
    import ray

    from pipelines.common import shard_paths
    from pipelines.evaluate import load_window_bytes
    from pipelines.worker import _batches

    ds = ray.data.read_parquet(shard_paths(data_dir, "train"))

    def order(shuffle, seed):
        batches = list(_batches(ds, 8, shuffle, seed, per_read=4))
        assert all(b.dtype == torch.uint8 and b.shape == (8, 16) for b in batches)  # window bytes
        return [tuple(row.tolist()) for b in batches for row in b]

    from collections import Counter

    shard = Counter(tuple(r.tolist()) for r in load_window_bytes(data_dir, "train"))
    n = sum(shard.values()) // 8 * 8  # whole batches; the last partial one is dropped
    first, again, later = order(8192, (0, 0, 0)), order(8192, (0, 1, 0)), order(8192, (0, 0, 0))
    small, plain = order(64, (0, 0, 0)), order(0, (0, 0, 0))  # a bounded buffer; no shuffle
    assert first == later and first != again and first != small != plain
    for read in (first, again, small, plain):
        assert len(read) == n and not Counter(read) - shard  # each window at most as often as it is there


def test_reading_the_shards_starts_two_footer_readers_not_thirty_two(data_dir):
    """Ray Data reads parquet footers with a pool of actors (32 by default, ~100 MB each: 3.3 GB
    of a 2-worker training run on 307 shards); clusters the platform starts give it two."""
    import ray

    from pipelines.common import shard_paths

    def footer_readers():
        return {a.actor_id for a in _actors("FooterReader")}

    before = footer_readers()
    ds = ray.data.read_parquet(shard_paths(data_dir, "train"))
    assert sum(len(b["bytes"]) for b in ds.iter_batches(batch_size=1024)) > 0  # a read (count() reads no footers)
    started = footer_readers() - before
    assert 1 <= len(started) <= 2


def test_the_validation_sample_is_spread_over_the_whole_split_at_any_size():
    from pipelines.worker import spread

    for keep, n in [(1, 5), (2, 5), (64, 1000), (512, 16_777_220), (4096, 3_000_000_001)]:
        pick = spread(keep, n)
        assert len(pick) == keep and pick[0] == 0 and (keep == 1 or pick[-1] == n - 1)
        assert (np.diff(pick) > 0).all() and pick.max() < n
