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
    """Rank 0's metric log: metrics and tags queue here, and a thread sends them to the run in
    batches. Training never waits for the tracker and never fails because of it.

    While the tracker is unreachable or failing, the queue keeps up to ``max_pending`` metrics
    (past that the oldest are dropped, and counted) and retries every ``retry_seconds``; what
    it holds is delivered when the tracker returns. ``close(timeout)`` waits for the rest and
    returns the account (``report``): metrics ``delivered``, ``delayed`` (delivered after a
    failed try), ``dropped`` (past the bound) and ``lost`` (still undelivered at close), and
    the ``failures`` (failed sends) behind them.
    """

    BATCH = 900  # MLflow takes up to 1000 metrics a call

    def __init__(self, uri: str, run_id: str, max_pending: int = 100_000, retry_seconds: float = 2.0):
        import threading
        from collections import deque

        from mlflow.tracking import MlflowClient

        # One quick try per send (MLflow's own HTTP retries would hold the queue for minutes);
        # this log retries by itself and keeps its order.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        self.client, self.run_id = MlflowClient(uri), run_id
        self.max_pending, self.retry_seconds = max_pending, retry_seconds
        self.pending: deque = deque()  # (sequence number, Metric)
        self.tags: dict[str, str] = {}
        self.report = {"delivered": 0, "delayed": 0, "dropped": 0, "lost": 0, "failures": 0}
        self.last_error = ""
        self._seq = 0
        self._delayed_below = 0  # metrics numbered below this met a failed send
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._send_loop, name="metric-log", daemon=True)
        self._thread.start()

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        with self._wake:
            for k, v in metrics.items():
                self.pending.append((self._seq, Metric(k, float(v), now, step)))
                self._seq += 1
            while len(self.pending) > self.max_pending:
                self.pending.popleft()
                self.report["dropped"] += 1

    def tag(self, key: str, value: str) -> None:
        with self._wake:
            self.tags[key] = str(value)

    def flush(self) -> None:
        """Ask the thread to send what is queued now (it does not wait for it)."""
        with self._wake:
            self._wake.notify()

    def close(self, timeout: float = 30.0) -> dict[str, int]:
        """Send what is left (waiting up to ``timeout`` s) and return the account."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)
        with self._wake:
            self.report["lost"] = len(self.pending)
            return dict(self.report)

    def _send_loop(self) -> None:
        from mlflow.entities import RunTag

        while True:
            with self._wake:
                if not self.pending and not self.tags:
                    if self._closed:
                        return
                    self._wake.wait()
                    continue
                batch = [self.pending[i] for i in range(min(self.BATCH, len(self.pending)))]
                tags = dict(self.tags)
            try:
                self.client.log_batch(
                    self.run_id, metrics=[m for _, m in batch], tags=[RunTag(k, v) for k, v in tags.items()]
                )
            except Exception as e:  # noqa: BLE001 - any tracker failure: keep the metrics, retry
                with self._wake:
                    self.report["failures"] += 1
                    self.last_error = f"{type(e).__name__}: {str(e)[:200]}"
                    self._delayed_below = self._seq
                    self._wake.wait(self.retry_seconds)
                continue
            with self._wake:
                for item in batch:  # delivered; still the oldest queued, unless dropped meanwhile
                    if self.pending and self.pending[0] is item:
                        self.pending.popleft()
                    else:
                        self.report["dropped"] -= 1  # dropped from the queue while it was sent: it arrived
                self.report["delivered"] += len(batch)
                self.report["delayed"] += sum(seq < self._delayed_below for seq, _ in batch)
                for k, v in tags.items():
                    if self.tags.get(k) == v:
                        del self.tags[k]


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
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[tag])]
    for attempt in range(3):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except Exception:  # noqa: BLE001 - concurrent runs (a sweep's trials) creating the same dataset race on
            if attempt == 2:  # its unique key; a retry finds it and links it
                raise
            time.sleep(0.5 * (attempt + 1))


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
