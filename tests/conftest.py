"""Shared fixtures: one real local Ray cluster per test session, a real MLflow store per test."""

from __future__ import annotations

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
