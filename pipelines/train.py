"""Train a BitTransformerLM with Ray Train on prepared shards; MLflow records the run.

    python pipelines/train.py --config configs/small.yaml [--set run.num_workers=2 ...]
    ray job submit --working-dir . -- python pipelines/train.py --config configs/small.yaml
    python pipelines/train.py --config configs/small.yaml --resume [--name RUN]

The driver prints the resolved config, refuses settings the strategy cannot honour (by name,
``ExperimentConfig.check_platform``), prepares the data if ``data.output_dir`` holds none,
opens (or, with ``--resume``, reopens) an MLflow run, and starts a ``TorchTrainer`` with
``run.num_workers`` workers running pipelines/worker.py: each reads its Ray Data shard of the
train split and trains by ``run.strategy`` (``ddp``, ``fsdp`` or ``pipeline``) through the one
bitlm Trainer step. Rank 0 logs per-step loss, bits/byte, parity bits/byte, K, C, S, learning rate and throughput,
and validation bits/byte per evaluation, to MLflow. Every ``run.checkpoint_every`` steps the
workers save a Ray Train checkpoint (model, optimizer, step, data position, sampler state); a
run restarted after a worker failure (``run.max_failures``) or with ``--resume`` continues from
the latest one. At the end the driver logs the final checkpoint, the data manifest and a plot
of loss and K/C/S to the run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bitlm.config import ConfigError, ExperimentConfig, dump_config, load_config, to_dict  # noqa: E402
from pipelines.common import (  # noqa: E402
    DataError,
    check_cluster_paths,
    init_ray,
    read_manifest,
    shard_paths,
    storage_path,
)
from pipelines.progress import TrainingProgress  # noqa: E402
from pipelines.tracking import (  # noqa: E402
    experiment_id,
    find_run,
    log_checkpoint,
    log_model,
    mlflow_client,
    open_run,
    plot_history,
    tracking_uri,
)
from pipelines.worker import train_func  # noqa: E402

# -- the driver ---------------------------------------------------------------------------------


def total_steps(cfg: ExperimentConfig, manifest: dict[str, Any]) -> int:
    """Optimizer steps in the run: max_steps, else epochs over each worker's share of the train
    split (every strategy splits the train windows over the workers), ``accum_steps``
    micro-batches a step."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    per_worker = manifest["splits"]["train"]["windows"] // cfg.run.num_workers
    return max(1, per_worker // (cfg.train.batch_size * cfg.train.accum_steps) * cfg.train.epochs)


def ensure_data(
    cfg: ExperimentConfig, data_dir: str | None = None, reprepare: bool = False
) -> tuple[str, dict[str, Any]]:
    """The prepared data directory and its manifest, preparing it first if it holds none (or
    none this bitlm reads). Data prepared from other settings or inputs than ``cfg.data``'s is
    refused by a DataError that names each difference, or with ``reprepare`` prepared again:
    a run never trains on stale shards, nor overwrites data it did not make unless told."""
    from pipelines.prepare_data import check_fresh, prepare

    data_dir = str(Path(data_dir or cfg.data.output_dir).resolve())
    try:
        manifest = read_manifest(data_dir)
    except DataError as e:
        print(f"preparing {data_dir}: {e}")
        manifest = prepare(cfg.data, output_dir=data_dir)
    stale = check_fresh(manifest, cfg.data)
    if stale and reprepare:
        print(f"preparing {data_dir} again: " + "; ".join(stale))
        manifest = prepare(cfg.data, output_dir=data_dir)
    elif stale:
        raise DataError(
            f"the prepared data in {data_dir} does not match this run: "
            + "; ".join(stale)
            + ". Prepare it again (train.py --reprepare, or pipelines/prepare_data.py with this config), "
            "or give the settings it was prepared with"
        )
    if manifest["window_bytes"] * 9 > cfg.model.max_seq_len:
        raise SystemExit(
            f"windows of {manifest['window_bytes']} bytes need model.max_seq_len >= {9 * manifest['window_bytes']}"
        )
    return data_dir, manifest


def check_gpus(cfg: ExperimentConfig, resources: dict[str, float]) -> None:
    """Refuse up front a ``run.use_gpu`` run that the cluster's GPUs (``resources``, Ray's
    ``cluster_resources()``) cannot place: each worker takes one, and Ray Train would wait for
    the missing ones without end. A cluster that adds GPU nodes on demand must hold them first
    (its GPU node type's min_workers)."""
    gpus = resources.get("GPU", 0)
    if cfg.run.use_gpu and gpus < cfg.run.num_workers:
        raise ConfigError(
            f"run.use_gpu=true needs {cfg.run.num_workers} GPUs (one per worker, run.num_workers), "
            f"but the Ray cluster has {gpus:g}: run on a cluster with GPUs, lower run.num_workers, "
            "or set run.use_gpu=false"
        )


def local_run_dir(cfg: ExperimentConfig, name: str) -> Path:
    """A local directory of the run: in the storage path when it is local, else in /tmp."""
    storage = storage_path(cfg.run.storage_path)
    run_dir = Path(storage) / name if "://" not in storage else Path(tempfile.gettempdir()) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def make_trainer(
    cfg: ExperimentConfig,
    data_dir: str,
    manifest: dict[str, Any],
    name: str,
    run_id: str,
    callbacks: list | None = None,
    keep_best: bool = False,
    verbose: bool = False,
):
    """The TorchTrainer of one training run (also what each Tune trial runs). ``keep_best``
    ranks kept checkpoints by validation bits/byte; otherwise the latest are kept."""
    import ray.data
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Read by fit() here and passed on to the run's controller and workers. Ray Train's
    # controller polls its workers every 2 s by default, and a run's start, each report that
    # reaches Tune and its end wait for a poll: short runs and sweeps spent much of their time
    # in that wait. Its preemption watcher, an actor per run, only logs node drains (nothing
    # here reads them). Either can be set otherwise in the environment.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    storage = storage_path(cfg.run.storage_path)
    run_dir = local_run_dir(cfg, name)
    return TorchTrainer(
        train_func,
        train_loop_config={
            "experiment": to_dict(cfg),
            "mlflow": {"uri": tracking_uri(), "run_id": run_id},
            "window_bytes": manifest["window_bytes"],
            "val_windows": manifest["splits"]["val"]["windows"],
            "total_steps": total_steps(cfg, manifest),
            "run_dir": str(run_dir),
            "verbose": verbose,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
            placement_strategy=cfg.run.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.run.keep_checkpoints,
                checkpoint_score_attribute="val_bpb" if keep_best else None,
                checkpoint_score_order="min",
            ),
            callbacks=callbacks,
        ),
        datasets={split: _quiet(ray.data.read_parquet(shard_paths(data_dir, split))) for split in ("train", "val")},
        dataset_config=DataConfig(datasets_to_split=["train"]),
    )


def run(
    cfg: ExperimentConfig,
    data_dir: str | None = None,
    name: str | None = None,
    resume: bool = False,
    progress: bool = False,
    verbose: bool = False,
    reprepare: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` on Ray; return {run_id, name, checkpoint, model_uri, registered, metrics}.

    ``progress`` draws one line that follows the run (pipelines/progress.py); ``verbose``
    keeps Ray Train's own per-report log lines, which are off otherwise; ``reprepare``
    prepares the data again when it does not match ``cfg.data`` (ensure_data)."""
    import ray

    cfg.check_platform()
    init_ray()
    check_gpus(cfg, ray.cluster_resources())
    check_cluster_paths(
        {"run.storage_path": cfg.run.storage_path, "data.output_dir": data_dir or cfg.data.output_dir},
        tracking_uri(),
    )
    data_dir, manifest = ensure_data(cfg, data_dir, reprepare)
    client = mlflow_client()
    if resume:
        mlrun = find_run(client, experiment_id(client, cfg.run.experiment), name, cfg.name)
        name, run_id = mlrun.data.tags["ray_run_name"], mlrun.info.run_id
        client.update_run(run_id, status="RUNNING")
        print(f"resuming Ray Train run {name} in MLflow run {run_id}")
    else:
        name = name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        run_id = open_run(client, cfg, name, data_dir, manifest)
    trainer = make_trainer(cfg, data_dir, manifest, name, run_id, verbose=verbose)
    started_ms = int(time.time() * 1000)

    def failures() -> int:
        """Worker group restarts after failures in this fit: its worker group starts but the first."""
        history = client.get_metric_history(run_id, "worker_group_start_step")
        return max(0, len([m for m in history if m.timestamp >= started_ms]) - 1)

    try:
        if progress:
            steps = total_steps(cfg, manifest)
            with TrainingProgress(client, run_id, steps, cfg.train.max_seconds):
                result = trainer.fit()
        else:
            result = trainer.fit()
    except Exception as e:
        client.set_terminated(run_id, status="FAILED")
        print(
            f"training failed after {failures()} recovered worker group failure(s) "
            f"(run.max_failures={cfg.run.max_failures}): {type(e).__name__}: {e}",
            flush=True,
        )
        raise
    recovered = failures()
    client.set_tag(run_id, "worker_group_failures", str(recovered))
    if recovered:
        print(
            f"recovered from {recovered} worker group failure(s) (run.max_failures={cfg.run.max_failures}): "
            "each restart resumed from the latest checkpoint there was",
            flush=True,
        )
    out: dict[str, Any] = {"run_id": run_id, "name": name, "metrics": dict(result.metrics or {})}
    m = out["metrics"]
    if m.get("tracker_failures"):  # the tracker failed during the run; training went on
        print(
            f"MLflow was unreachable {int(m['tracker_failures'])} time(s) during training: metrics delayed "
            f"{int(m['tracker_delayed'])}, dropped {int(m['tracker_dropped'])}, lost {int(m['tracker_lost'])}",
            flush=True,
        )
    if result.checkpoint is not None:
        final = local_run_dir(cfg, name) / "final_checkpoint"
        out["checkpoint"] = str(log_checkpoint(client, run_id, result.checkpoint, final))
        scores = {k: v for k, v in out["metrics"].items() if k in ("val_bpb", "val_loss", "step")}
        with _mlflow_quiet(not verbose):
            out.update(log_model(run_id, final, cfg.run.registered_model or None, scores))
    with tempfile.TemporaryDirectory() as d:
        png = plot_history(client, run_id, Path(d) / "training_curves.png")
        client.log_artifact(run_id, str(png), "plots")
    client.set_terminated(run_id, status="FINISHED")
    return out


@contextlib.contextmanager
def _mlflow_quiet(quiet: bool):
    """MLflow's own chatter while it logs and registers a model (a download bar, 'Successfully
    registered model', 'Created version') off: the run prints what it registered itself."""
    if not quiet:
        yield
        return
    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.WARNING)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def _quiet(ds):
    """No progress bars for the datasets workers stream: one per epoch and worker is noise."""
    ds.context.enable_progress_bars = False
    return ds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--data", help="prepared data directory (default: data.output_dir)")
    ap.add_argument("--name", help="Ray Train run name (default: <config name>-<time>)")
    ap.add_argument(
        "--resume", action="store_true", help="continue a run from its latest checkpoint, in the same MLflow run"
    )
    ap.add_argument("--verbose", action="store_true", help="keep Ray Train's per-report log lines")
    ap.add_argument(
        "--reprepare",
        action="store_true",
        help="prepare the data again when it was prepared from other inputs or data settings (else: refused)",
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(dump_config(cfg))
    out = run(
        cfg, args.data, args.name, args.resume, sys.stdout.isatty(), verbose=args.verbose, reprepare=args.reprepare
    )
    m = out["metrics"]
    print(
        f"\nrun {out['name']} finished: step {m.get('step')}, loss {m.get('loss', float('nan')):.4f}, val bits/byte {m.get('val_bpb', float('nan')):.3f}"
    )
    print(f"MLflow run {out['run_id']} at {tracking_uri()}; checkpoint {out.get('checkpoint')}")
    if out.get("registered"):
        print(f"registered model {out['registered']} (serve it: make serve CHECKPOINT={out['registered']})")
    return out


if __name__ == "__main__":
    main()
