"""MLflow: where runs are recorded and compared. The store, experiments, a training run's
params/tags/artifacts and dataset input, rank 0's buffered metric log and system metrics, the
final checkpoint logged as an MLflow model and registered, and the curves plot.

The store is ``MLFLOW_TRACKING_URI`` when set (a tracking server on a cluster), else a SQLite
file ``./mlflow.db`` with artifacts beside it in ``./mlartifacts``. Experiments are created with
MLflow's model-training kind, so the UI opens them on their runs and charts.
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


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # the UI's model-training view


def experiment_id(client, name: str) -> str:
    """The id of MLflow experiment ``name``, created on first use with the model-training kind
    (an older experiment without it gets the tag). A local store keeps its artifacts beside the
    database (``mlartifacts/``); a tracking server decides for itself."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            client.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        db = Path(tracking_uri()[len("sqlite:///") :])
        location = (db.parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def experiment_link(base_url: str, exp_id: str) -> str:
    """The MLflow UI page of an experiment in its model-training view (MLflow 3's UI picks the
    view from this parameter, else from the last one the browser used, GenAI by default)."""
    return f"{base_url.rstrip('/')}/#/experiments/{exp_id}?workflowType=machine_learning"


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
    log_dataset(client, run_id, data_dir, manifest)
    return run_id


def dataset_digest(manifest: dict[str, Any]) -> str:
    """A fingerprint of prepared data: its shards' checksums and the settings that made them."""
    import hashlib

    shards = sorted(f"{s['file']}:{s['sha256']}" for s in manifest.get("shards", []))
    settings = json.dumps({"inputs": manifest.get("inputs"), "window_bytes": manifest.get("window_bytes")})
    return hashlib.sha256("\n".join([settings, *shards]).encode()).hexdigest()[:16]


def log_dataset(client, run_id: str, data_dir: str, manifest: dict[str, Any]) -> None:
    """The prepared data as the run's training input (MLflow's Datasets: source, digest, size)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    splits = manifest.get("splits", {})
    inputs = ",".join(manifest.get("inputs") or [])[:200]
    name = f"{Path(data_dir).name} ({inputs}, {splits.get('train', {}).get('windows', '?')} train windows)"
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a local directory or a URI
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(data_dir))
    dataset = MetaDataset(source, name=name, digest=dataset_digest(manifest))
    tag = InputTag(key="mlflow.data.context", value="training")
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[tag])])


def system_metrics(run_id: str, uri: str, interval: float = 5.0):
    """MLflow's system-metrics monitor for ``run_id`` (CPU, memory, disk, network; GPU where
    NVIDIA's library finds one): a thread logging ``system/*`` metrics every ``interval`` s.
    Call ``.finish()`` when training ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=uri)
    monitor.start()
    return monitor


def log_model(run_id: str, checkpoint: Path, name: str | None, metrics: dict[str, float]) -> dict[str, Any]:
    """Log a checkpoint directory to the run as an MLflow model (a pyfunc whose ``predict``
    continues prompts through bitlm's gated loop, pipelines/mlflow_model.py) and, with a
    ``name``, register it: ``models:/<name>/<version>`` then loads in Serve and evaluate.py.
    Returns the model's URI and registered version."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    with mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts={"checkpoint": str(checkpoint)},
            registered_model_name=name,
            pip_requirements=["bitlm", "torch", "safetensors", "numpy", "pyyaml"],
            metadata={k: float(v) for k, v in metrics.items()},
        )
    out = {"model_uri": info.model_uri, "registered": None}
    if name and info.registered_model_version is not None:
        out["registered"] = f"models:/{name}/{info.registered_model_version}"
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """A bitlm checkpoint directory at ``path``, or inside an MLflow model's files there (its
    ``artifacts/<name>`` directory)."""
    path = Path(path)
    nested = sorted(p for p in (path / "artifacts").glob("*") if p.is_dir()) if (path / "MLmodel").is_file() else []
    for candidate in (path, *nested):
        if (candidate / "config.json").is_file():
            return candidate
    return path  # not a checkpoint: bitlm's loader says what is missing


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
