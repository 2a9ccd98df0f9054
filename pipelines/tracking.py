"""MLflow: where runs are recorded and compared. The store, experiments, a training run's
params/tags/artifacts, rank 0's buffered metric log, the final checkpoint and the curves plot.

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else a SQLite
file ``./mlflow.db`` with artifacts beside it in ``./mlartifacts``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from bitlm.config import ExperimentConfig, dump_config, flatten

ROOT = Path(__file__).resolve().parent.parent


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri())


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name``, created on first use. A local store keeps its
    artifacts beside the database (``mlartifacts/``); a tracking server decides for itself."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        db = Path(tracking_uri()[len("sqlite:///") :])
        location = (db.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class MetricLog:
    """Rank 0's metric log: buffered, sent in batches to the run."""

    def __init__(self, uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.buffer = MlflowClient(uri), run_id, []

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), now, step) for k, v in metrics.items()]

    def flush(self) -> None:
        for i in range(0, len(self.buffer), 900):  # MLflow takes up to 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 900])
        self.buffer = []


def open_run(
    client,
    cfg: ExperimentConfig,
    name: str,
    data_dir: str,
    manifest: dict[str, Any],
    tags: dict[str, str] | None = None,
) -> str:
    """A new MLflow run for a training: tags, every config param, the data manifest."""
    from mlflow.entities import Param

    exp_id = experiment_id(client, cfg.run.experiment)
    all_tags = {
        "ray_run_name": name,
        "config_name": cfg.name,
        "strategy": cfg.run.strategy,
        "world_size": str(cfg.run.num_workers),
        "git_commit": git_commit(),
        "data_dir": data_dir,
        **(tags or {}),
    }
    run_id = client.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    items = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])
    with tempfile.TemporaryDirectory() as d:
        Path(d, "manifest.json").write_text(json.dumps(manifest, indent=2))
        Path(d, "config.yaml").write_text(dump_config(cfg))
        client.log_artifact(run_id, str(Path(d, "manifest.json")), "data")
        client.log_artifact(run_id, str(Path(d, "config.yaml")))
    return run_id


def find_run(client, exp_id: str, name: str | None, config_name: str):
    """The MLflow run to resume: the one with this Ray run name, else this config's latest."""
    query = f"tags.ray_run_name = '{name}'" if name else f"tags.config_name = '{config_name}'"
    runs = client.search_runs([exp_id], query, order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        raise SystemExit(f"--resume: no MLflow run found for {'name ' + name if name else 'config ' + config_name}")
    return runs[0]


def log_checkpoint(client, run_id: str, checkpoint, directory: Path) -> Path:
    """Copy a Ray Train checkpoint's model files to ``directory`` and log them to the run."""
    with checkpoint.as_directory() as d:
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for f in ("config.json", "model.safetensors"):
            shutil.copy(Path(d) / f, directory / f)
    client.log_artifacts(run_id, str(directory), "checkpoint")
    return directory


def plot_history(client, run_id: str, out: Path) -> Path:
    """A PNG of loss, bits/byte and K/C/S against step, from the run's metric history."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, keys, title in (
        (axes[0], ["loss"], "training loss (nats/bit)"),
        (axes[1], ["bpb", "val_bpb"], "bits per byte"),
        (axes[2], ["K", "C", "S"], "telemetry"),
    ):
        for key in keys:
            hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            if hist:
                marker = "o" if key == "val_bpb" else None
                ax.plot([m.step for m in hist], [m.value for m in hist], label=key, marker=marker, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
