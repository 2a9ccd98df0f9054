"""Faults that must lose nothing, and input that must crash nothing (issue 15).

    python benchmarks/faults.py [--only outage,resume,replica,hostile] [--out benchmarks/results/faults.json]

Four sections, each runnable alone (``--only``; the sections not run keep their entries in
``--out``). Times on 2 loaded cores:

- ``outage`` (~4 min): an MLflow tracking server (a real one, one worker, SQLite) records a Ray
  Train run of the tiny config (``--steps``); once the run's first metrics arrive the server is
  stopped, and restarted on the same store ``--outage-seconds`` later. The run must finish; its
  result carries rank 0's account of metrics delivered, delayed, dropped and lost (lost must be
  0), and the store must hold bpb for every step.
- ``resume`` (~9 min; benchmarks/faults_resume.py): a process rewriting a checkpoint SIGKILLed
  ``--kills`` times (each time the directory must load) and a 1 MB tmpfs filled by a checkpoint
  write (CheckpointError, the last checkpoint intact); then a Ray Train run whose checkpoint
  writer is SIGKILLed ``--resume-kills`` times, at random moments and during checkpoint writes,
  each restart resuming from the last good checkpoint (steps redone at most
  ``--checkpoint-every``), and a run whose storage fills during a checkpoint: it stops, saying
  so, and resumes with space from the last good checkpoint. The tmpfs parts need root.
- ``replica`` (~1 min; benchmarks/faults_replica.py): the Serve model replica SIGKILLed during
  16 concurrent streams, ``--replica-rounds`` times: every stream ends complete or with an
  explicit error, none is cut silently or hangs, and requests after the restore succeed.
- ``hostile`` (~1 min; benchmarks/faults_hostile.py): ``--hostile-cases`` generated cases
  (tests/hostile_cases.py) against the codec, the config loader and the HTTP API: 0 crashes,
  0 5xx.

``--note`` records how the machine was shared during the run; each section records the load
average before and after it.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

SECTIONS = ("outage", "resume", "replica", "hostile")


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
        "bpb_steps_in_store": len({p.step for p in history}),
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


def _resume(args, work: Path) -> dict:
    import faults_resume as fr

    return {
        "killed_checkpoint_writer": killed_writer(args.kills, work),
        "full_disk_during_checkpoint": full_disk(work),
        "worker_killed_during_checkpoint": fr.killed_worker_resume(
            args.resume_kills, args.resume_steps, args.checkpoint_every, work
        ),
        "run_storage_full_during_checkpoint": fr.full_disk_resume(
            max(60, 8 * args.checkpoint_every), args.checkpoint_every, work
        ),
    }


def _run_section(name: str, args, work: Path) -> dict:
    if name == "outage":
        return {"tracker_outage": tracker_outage(args.outage_seconds, args.steps, work)}
    if name == "resume":
        return _resume(args, work)
    if name == "replica":
        from faults_replica import replica_killed

        return {"replica_killed_mid_stream": replica_killed(args.replica_rounds)}
    from faults_hostile import hostile_input

    return {"hostile_input": hostile_input(args.hostile_cases)}


def goals(r: dict) -> dict:
    """Each goal of issue 15 that the results at hand decide."""
    g = {}
    if "tracker_outage" in r:
        t = r["tracker_outage"]
        g["outage_run_finished_lost_0"] = t["finished"] and t["tracker"]["lost"] == 0
        g["outage_bpb_for_every_step"] = t.get("bpb_steps_in_store") == t["bpb_points_expected"]
    if "killed_checkpoint_writer" in r:
        k = r["killed_checkpoint_writer"]
        g["killed_writer_always_loadable"] = k["loadable_after_kill"] == k["kills"]
    if "worker_killed_during_checkpoint" in r:
        w = r["worker_killed_during_checkpoint"]
        g["killed_worker_run_finished"] = w["finished"]
        g["killed_worker_resumes_within_one_interval"] = w["every_resume_within_one_interval"]
    if "run_storage_full_during_checkpoint" in r and "skipped" not in r["run_storage_full_during_checkpoint"]:
        f = r["run_storage_full_during_checkpoint"]
        g["full_disk_stops_saying_so"] = f["stopped"] and f["error_says_disk_full"]
        g["full_disk_resumes_within_one_interval"] = (
            f["resumed"] and 0 <= (f["steps_redone"] or -1) <= f["checkpoint_every"]
        )
    if "replica_killed_mid_stream" in r:
        s = r["replica_killed_mid_stream"]
        g["replica_no_silent_truncation_no_hang"] = s["silent_truncation"] == 0 and s["hang"] == 0
        g["replica_later_requests_ok"] = s["later_ok"] == s["later_requests"]
    if "hostile_input" in r:
        h = r["hostile_input"]
        g["hostile_10k_cases_0_crashes_0_5xx"] = h["cases"] >= 10_000 and h["crashes"] == 0 and h["http_5xx"] == 0
    return g


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS))
    ap.add_argument("--outage-seconds", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=400, help="the tracked run's length (it must outlast the outage)")
    ap.add_argument("--kills", type=int, default=20, help="kills of the looping checkpoint writer")
    ap.add_argument("--resume-kills", type=int, default=8, help="kills of the Ray Train run's checkpoint writer")
    ap.add_argument("--resume-steps", type=int, default=300)
    ap.add_argument("--checkpoint-every", type=int, default=10, help="the Ray Train runs' checkpoint interval")
    ap.add_argument("--replica-rounds", type=int, default=3)
    ap.add_argument("--hostile-cases", type=int, default=10_000)
    ap.add_argument("--note", default="", help="how the machine was shared during the run")
    ap.add_argument("--out", default="benchmarks/results/faults.json")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown:
        ap.error(f"--only: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() and set(names) != set(SECTIONS) else {}
    result.pop("goals", None)
    runs = result.setdefault("sections", {})
    for name in names:
        with tempfile.TemporaryDirectory() as d:
            load, start = os.getloadavg(), time.time()
            print(f"== {name}", flush=True)
            result.update(_run_section(name, args, Path(d)))
            runs[name] = {"seconds": round(time.time() - start, 1), "date": time.strftime("%Y-%m-%d %H:%M"),
                          "load_average_1m_before": round(load[0], 2),
                          "load_average_1m_after": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(),
                          **({"note": args.note} if args.note else {})}  # fmt: skip
    result["goals"] = goals(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
