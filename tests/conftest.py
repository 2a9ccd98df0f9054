"""Shared fixtures: one real local Ray cluster per test session, a real MLflow store per test."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray cluster for the whole session (about 7 s to start; tests share it)."""
    import ray

    from pipelines.common import init_ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "300"
    init_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store; the pipelines read it from MLFLOW_TRACKING_URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# -- small data and models the library tests share ----------------------------------------------

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=90, dropout=0.0)


def learnable_windows(n: int = 64):
    """Windows of 90 bits (10 bytes) of a short repeated phrase, at every byte offset: easy to learn."""
    import torch

    from bitlm import text_to_bits

    bits = torch.tensor(text_to_bits("the cat sat on the mat. " * 20))
    return torch.stack([bits[9 * i : 9 * i + 90] for i in range(n)])


def train_on_phrase(model, window: int, steps: int = 60):
    """Train ``model`` (byte_patch) briefly on windows of ``window`` bytes at random places in a
    short repeated phrase: its next-byte distributions become peaked (greedy text repeats the
    phrase). Returns it in eval mode."""
    import numpy as np
    import torch

    from bitlm import TrainConfig, Trainer, bytes_to_bits

    trainer, text = Trainer(model, TrainConfig(lr=3e-3, warmup_steps=5)), b"the cat sat on the mat. " * 8
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(text) - window, (16,), generator=g).tolist()
        rows = np.frombuffer(b"".join(text[s : s + window] for s in starts), np.uint8).reshape(16, window)
        trainer.train_step([torch.from_numpy(bytes_to_bits(rows)).long()])
    return model.eval()


# -- the Serve application (shared by test_serve.py and test_playground.py) -------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(store_uri: str, artifacts: Path, port: int | None = None):
    """A real MLflow tracking server (one worker) over ``store_uri``; yields its URL."""
    import subprocess
    import time
    import urllib.request

    port = port or free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", store_uri, "--default-artifact-root", str(artifacts)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """A small trained byte_patch checkpoint, and a degenerate one that only ever says 0x00."""
    import torch

    from bitlm import BitTransformerLM, text_to_bits, train_loop

    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = BitTransformerLM(
        d_model=32,
        nhead=4,
        num_layers=2,
        dim_feedforward=64,
        max_seq_len=576,
        dropout=0.0,
        arch="byte_patch",
        patch_bytes=2,
    )
    # Trained until its ordinary samples are this English: they pass the guide's gate.
    text = (
        "The quick brown fox jumps over the lazy dog. A wizard's job is to vex chumps quickly in fog. "
        "Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump! "
    )
    stream = torch.tensor(text_to_bits(text * 12))
    train_loop(model, torch.stack([stream[9 * i : 9 * i + 576] for i in range(64)]), epochs=24, batch_size=8, lr=3e-3)
    model.save_pretrained(d / "good")
    with torch.no_grad():
        model.io.byte_head.weight.zero_()
        model.io.byte_head.bias.fill_(-30.0)
        model.io.byte_head.bias[0] = 30.0
    model.save_pretrained(d / "degenerate")
    return d


DEGENERATE_KEY = "degenerate-key"  # the /degenerate app takes an API key (serve/auth.py); "bitlm" none


@pytest.fixture(scope="module")
def server(ray_session, checkpoints):
    """The Serve app at http://127.0.0.1:<port>/ (model "bitlm"), and a degenerate one at
    /degenerate (model "degenerate", API key DEGENERATE_KEY) whose gate blocks it. One per test module, shut down after
    it: its replicas hold CPUs that other modules' Ray Train and Ray Data work needs."""
    import time
    import urllib.request

    from ray import serve

    from serve.app import build

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build({"checkpoint": str(checkpoints / "good"), "max_prompt_bytes": 256, "max_tokens": 64}),
        name="bitlm",
        route_prefix="/",
    )
    gate = {"c_floor": 0.5, "s_floor": 0.0, "decay": 0.5, "burn_in": 4, "max_retries": 1}
    serve.run(
        build(
            {
                "checkpoint": str(checkpoints / "degenerate"),
                "model_name": "degenerate",
                "gate": gate,
                "api_key": DEGENERATE_KEY,
            }
        ),
        name="degenerate",
        route_prefix="/degenerate",
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(base + "/health", timeout=5)
            break
        except OSError:
            time.sleep(1)
    yield base
    serve.shutdown()
