"""What the dashboard does behind its page (serve/dashboard.py routes to these): runs and their
curves from MLflow, a model's per-byte telemetry and attention, training runs started from the
page, and checkpoints (list, load, export, import, register). Plain functions over the
platform's own pieces; errors a user can cause are APIError (4xx)."""

import io
import os
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import torch

from bitlm import BitTransformerLM, CheckpointError
from bitlm.gated import GateSettings, gate_text, stream_bytes
from serve.schemas import APIError

ROOT = Path(__file__).resolve().parent.parent
CURVES = ("loss", "bpb", "val_bpb", "K", "C", "S", "lr", "throughput_bits_per_s")


# -- runs (MLflow) ---------------------------------------------------------------------------------


def _client():
    from pipelines.tracking import mlflow_client

    return mlflow_client()


def runs(experiment: str = "bitlm", limit: int = 50) -> list[dict[str, Any]]:
    """The experiment's runs, newest first: name, status, latest metrics, start time."""
    client = _client()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    found = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    return [
        {
            "run_id": r.info.run_id,
            "name": r.info.run_name,
            "status": r.info.status,
            "start": r.info.start_time,
            "metrics": {k: v for k, v in r.data.metrics.items() if not k.startswith("system/")},
            "config": r.data.tags.get("config_name"),
        }
        for r in found
    ]


def curves(run_id: str, keys: tuple[str, ...] = CURVES) -> dict[str, list[list[float]]]:
    """Metric histories of a run: {key: [[step, value], ...]}."""
    client = _client()
    try:
        client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow raises its own exception types for an unknown id
        raise APIError(404, f"no MLflow run {run_id!r}", "run_id") from None
    out = {}
    for key in keys:
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        if hist:
            out[key] = [[m.step, m.value] for m in hist]
    return out


# -- telemetry of a text ------------------------------------------------------------------------


@torch.no_grad()
def telemetry(model, prompt: str, max_new_bytes: int = 64, seed: int = 0, max_side: int = 48) -> dict[str, Any]:
    """Per-byte K, C, S over a prompt and a continuation the model writes (each byte judged on
    everything before it, by the gated loop's rule), and the attention maps of the whole text
    (per layer, heads averaged, down-sampled to at most ``max_side`` x ``max_side``)."""
    data = prompt.encode("utf-8")
    if not data:
        raise APIError(400, "the prompt is empty", "prompt")
    gate = GateSettings().open()
    continuation = bytes(e.byte for e in stream_bytes(model, data, max_new_bytes, 0.8, 1.0, seed, gate))
    events = gate_text(model, data[:1], data[1:] + continuation, gate)
    text = data + continuation
    bits = torch.tensor(__import__("bitlm").text_to_bits(text.decode("utf-8", errors="replace")))
    bits = bits[: model.io.max_bits // 9 * 9][None]
    _, tel = model(bits, return_attention=True)
    maps = []
    for att in tel["attention_maps"]:
        a = att[0].float().mean(0)[None, None]  # (1, 1, T, S) heads averaged
        side = min(max_side, a.size(-1))
        maps.append(torch.nn.functional.adaptive_avg_pool2d(a, side)[0, 0].tolist())
    return {
        "text": text.decode("utf-8", errors="replace"),
        "prompt_bytes": len(data),
        "bytes": [{"index": e.index + 1, "byte": e.byte, "K": e.K, "C": e.C, "S": e.S} for e in events],
        "attention": maps,
        "positions": "patches" if model.config.arch == "byte_patch" else "bits",
    }


# -- training runs started from the page ----------------------------------------------------------


class Jobs:
    """Training runs the dashboard started: pipelines/train.py in a subprocess each (a real Ray
    Train run that logs to the same MLflow store), with their output kept."""

    def __init__(self):
        self.jobs: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def start(self, config: str, overrides: list[str]) -> dict[str, Any]:
        path = ROOT / "configs" / f"{config}.yaml"
        if not path.is_file() or path.parent != ROOT / "configs":
            raise APIError(400, f"no config {config!r}; choose one of {configs()}", "config")
        for item in overrides:
            if "=" not in item:
                raise APIError(400, f"override {item!r} must look like key=value", "overrides")
        from bitlm import ConfigError, load_config

        try:
            load_config(path, overrides).check_platform()
        except ConfigError as e:
            raise APIError(400, str(e), "overrides") from None
        name = f"dash-{config}-{time.strftime('%Y%m%d-%H%M%S')}"
        log = ROOT / "runs" / "dashboard" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(ROOT / "pipelines" / "train.py"), "--config", str(path), "--name", name]
        for item in overrides:
            cmd += ["--set", item]
        handle = log.open("w")
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=os.environ.copy())
        with self.lock:
            self.jobs[name] = {"name": name, "config": config, "overrides": overrides, "proc": proc, "log": log}
        return self.status(name)

    def status(self, name: str) -> dict[str, Any]:
        job = self.jobs.get(name)
        if job is None:
            raise APIError(404, f"no training job {name!r}", "name")
        code = job["proc"].poll()
        tail = job["log"].read_text(errors="replace")[-2000:] if job["log"].exists() else ""
        state = "running" if code is None else ("finished" if code == 0 else "failed")
        return {"name": name, "config": job["config"], "overrides": job["overrides"], "state": state, "log_tail": tail}

    def all(self) -> list[dict[str, Any]]:
        return [self.status(n) for n in list(self.jobs)]


def configs() -> list[str]:
    return sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))


# -- checkpoints ------------------------------------------------------------------------------------


def checkpoints(base: Path) -> dict[str, Any]:
    """Local checkpoint directories (under ``base``, runs/ by default) and the registered
    MLflow models."""
    local = []
    for cfg in sorted(base.glob("**/config.json")):
        if (cfg.parent / "model.safetensors").is_file():
            local.append({"path": str(cfg.parent), "modified": cfg.stat().st_mtime})
    registered = []
    try:
        client = _client()
        for rm in client.search_registered_models():
            for v in rm.latest_versions or []:
                registered.append({"uri": f"models:/{rm.name}/{v.version}", "run_id": v.run_id})
    except Exception:  # noqa: BLE001 - no store yet: nothing registered
        pass
    return {"local": local, "registered": registered}


def load(source: str):
    """A model from a local checkpoint directory or an MLflow URI; 400 naming what is wrong."""
    from serve.deployment import load_checkpoint

    try:
        return load_checkpoint(source)
    except CheckpointError as e:
        raise APIError(400, str(e), "source") from None
    except Exception as e:  # noqa: BLE001 - MLflow's own errors for an unknown model or run
        raise APIError(404, f"cannot load {source!r}: {type(e).__name__}: {e}", "source") from None


def export(path: str) -> bytes:
    """A checkpoint directory as a zip (config.json + model.safetensors)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise APIError(404, f"{path} is not a checkpoint directory", "path")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for f in ("config.json", "model.safetensors"):
            z.write(directory / f, f)
    return buf.getvalue()


def import_zip(base: Path, name: str, data: bytes) -> dict[str, Any]:
    """Unpack a zipped checkpoint under ``base``/imported/<name> and check that it loads."""
    if not name or not name.replace("-", "").replace("_", "").isalnum():
        raise APIError(400, "name must be letters, digits, - and _", "name")
    target = base / "imported" / name
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            members = set(z.namelist())
            if not {"config.json", "model.safetensors"} <= members:
                raise APIError(
                    400, f"the zip must hold config.json and model.safetensors, it holds {sorted(members)[:5]}"
                )
            target.mkdir(parents=True, exist_ok=True)
            for f in ("config.json", "model.safetensors"):
                (target / f).write_bytes(z.read(f))
    except zipfile.BadZipFile:
        raise APIError(400, "the upload is not a zip file", "file") from None
    try:
        model = BitTransformerLM.from_pretrained(target)
    except CheckpointError as e:
        raise APIError(400, f"not a bitlm checkpoint: {e}", "file") from None
    return {"path": str(target), "parameters": model.num_parameters()}


def register(path: str, name: str) -> dict[str, Any]:
    """Register a local checkpoint as an MLflow model ``name`` (in a run of its own)."""
    from pipelines.tracking import experiment_id, log_model, mlflow_client

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise APIError(404, f"{path} is not a checkpoint directory", "path")
    client = mlflow_client()
    run = client.create_run(experiment_id(client, "bitlm"), run_name=f"import-{name}", tags={"imported_from": path})
    out = log_model(run.info.run_id, directory, name, {})
    client.set_terminated(run.info.run_id)
    return {"run_id": run.info.run_id, **out}
