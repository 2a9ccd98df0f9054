"""Faults that must lose nothing: the tracker going away mid-run, a checkpoint writer killed
mid-write, a disk that fills during a checkpoint.

    python benchmarks/faults.py [--outage-seconds 30] [--kills 20] [--out benchmarks/results/faults.json]

1. Tracker outage: an MLflow tracking server (a real one, one worker, SQLite) records a Ray
   Train run of the tiny config; ``--outage-seconds`` after the run's first metrics arrive the
   server is stopped, and restarted on the same store after ``--outage-seconds``. The run must
   finish; its result carries rank 0's account of metrics delivered, delayed, dropped and lost,
   and the store is read back for the metrics the run logged.
2. Killed writer: a process rewrites a ~75 MB checkpoint in a loop and is SIGKILLed ``--kills``
   times at random moments; after each kill the directory must load (the old or the new model).
3. Full disk (root only): a 1 MB tmpfs holds a small checkpoint; writing a larger one over it
   must fail with CheckpointError and leave the small one loadable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _server(store: str, artifacts: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", store, "--default-artifact-root", str(artifacts)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("the MLflow server did not start")


def tracker_outage(outage: float, steps: int, work: Path) -> dict:
    import socket

    from bitlm import load_config
    from bitlm.config import apply_overrides

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store, artifacts = f"sqlite:///{work / 'mlflow.db'}", work / "artifacts"
    proc = _server(store, artifacts, port)
    uri = f"http://127.0.0.1:{port}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    from pipelines import train
    from pipelines.common import init_ray
    from pipelines.prepare_data import prepare

    init_ray(quiet=True)
    cfg = apply_overrides(
        load_config(ROOT / "configs" / "tiny.yaml"),
        {"data.output_dir": str(work / "data"), "run.storage_path": str(work / "ray"), "train.max_steps": steps,
         "train.max_seconds": None, "train.log_every": 5, "train.eval_every": 50,
         "run.checkpoint_every": 100, "run.system_metrics_seconds": 0},
    )  # fmt: skip
    prepare(cfg.data, None, cfg.data.output_dir, quiet=True)
    events: dict = {}

    def outage_thread() -> None:
        nonlocal proc
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        while not events.get("stop"):
            runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1)
            if runs and runs[0].data.metrics.get("bpb") is not None:
                break
            time.sleep(1)
        time.sleep(5)
        proc.terminate()
        proc.wait()
        events["stopped_at"] = time.time()
        time.sleep(outage)
        proc = _server(store, artifacts, port)
        events["restarted_at"] = time.time()

    t = threading.Thread(target=outage_thread, daemon=True)
    t.start()
    start = time.time()
    out = train.run(cfg)
    events["stop"] = True
    t.join(timeout=120)
    from mlflow.tracking import MlflowClient

    history = MlflowClient(uri).get_metric_history(out["run_id"], "bpb")
    m = out["metrics"]
    result = {
        "outage_seconds": round(events["restarted_at"] - events["stopped_at"], 1) if "restarted_at" in events else None,
        "run_seconds": round(time.time() - start, 1),
        "finished": True,
        "steps": int(m["step"]),
        "tracker": {k: int(m.get(f"tracker_{k}", -1)) for k in ("delivered", "delayed", "dropped", "lost", "failures")},
        "bpb_points_in_store": len(history),
        "bpb_points_expected": int(m["step"]),  # rank 0 logs bpb every step
    }
    proc.terminate()
    proc.wait()
    return result


_WRITER = """
import sys, torch
from bitlm import BitTransformerLM
torch.manual_seed(int(sys.argv[2]))
m = BitTransformerLM(d_model=512, nhead=8, num_layers=6, dim_feedforward=2048, max_seq_len=72)
print("ready", flush=True)
while True:
    m.save_pretrained(sys.argv[1])
"""


def killed_writer(kills: int, work: Path) -> dict:
    import torch

    from bitlm import BitTransformerLM, CheckpointError

    torch.manual_seed(0)
    small = BitTransformerLM(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=72)
    target = work / "ckpt"
    small.save_pretrained(target)
    rng, loaded, refused, old, new = random.Random(0), 0, [], 0, 0
    for k in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target), str(k)], stdout=subprocess.PIPE)
        proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        try:
            d = BitTransformerLM.from_pretrained(target).config.d_model
            loaded += 1
            old += d == 32
            new += d == 512
        except CheckpointError as e:
            refused.append(str(e))
        if k % 5 == 4:
            small.save_pretrained(target)  # back to the old model now and then
    return {"kills": kills, "loadable_after_kill": loaded, "old_model": old, "new_model": new, "refused": refused}


def full_disk(work: Path) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a small tmpfs"}
    import torch

    from bitlm import BitTransformerLM, CheckpointError

    disk = work / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], check=True)
    try:
        torch.manual_seed(0)
        small = BitTransformerLM(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=72)
        small.save_pretrained(disk / "ckpt")
        big = BitTransformerLM(d_model=256, nhead=4, num_layers=2, dim_feedforward=1024, max_seq_len=72)
        try:
            big.save_pretrained(disk / "ckpt")
            error = None
        except CheckpointError as e:
            error = str(e)
        still = BitTransformerLM.from_pretrained(disk / "ckpt").config.d_model == 32
        return {"error": error, "last_good_checkpoint_loads": still}
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)  # loaded weights may still map it


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outage-seconds", type=float, default=30.0)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=400, help="the tracked run's length (it must outlast the outage)")
    ap.add_argument("--out", default="benchmarks/results/faults.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        result = {
            "killed_checkpoint_writer": killed_writer(args.kills, work),
            "full_disk_during_checkpoint": full_disk(work),
            "tracker_outage": tracker_outage(args.outage_seconds, args.steps, work),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
