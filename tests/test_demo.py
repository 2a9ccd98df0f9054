"""`make demo`'s job on a fresh checkout: prepare -> train -> evaluate -> sample, on defaults."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_on_a_fresh_checkout(tmp_path):
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    checkout = tmp_path / "clone"
    for name in files.stdout.split():
        if (ROOT / name).is_file():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, checkout / name)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    done = subprocess.run(
        [sys.executable, "pipelines/demo.py", "--set", "train.max_seconds=20", "--set", "train.eval_every=40"],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, out[-3000:] + done.stderr[-3000:]
    assert "| BitTransformerLM (this run" in out and "| xz-9e |" in out  # the bits/byte table
    assert "'The return statement' ->" in out  # a generated sample
    assert "mlflow ui --backend-store-uri sqlite:///" in out
    assert (checkout / "mlflow.db").exists() and (checkout / "data" / "prepared" / "manifest.json").exists()
