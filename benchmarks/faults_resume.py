"""Ray Train runs for benchmarks/faults.py that must resume from the last good checkpoint after
a worker killed during a checkpoint write and after a disk filled during one, redoing at most
one checkpoint interval.

- ``killed_worker_resume``: one Ray Train run of the tiny config (model widened so a checkpoint
  is ~40 MB: its write is a visible part of each interval) through pipelines/train.py, 2
  workers (ddp), ``run.max_failures`` above the number of kills. Rank 0 (the worker seen
  writing checkpoints in /proc/<pid>/fd) is killed again and again, each time once its group
  has begun a checkpoint write: half the kills at a random moment of the next ~3 s (about an
  interval), half of the next ~0.15 s (about one write). A kill is SIGSTOP, a look, SIGKILL:
  what the frozen worker holds open (a checkpoint file, bitlm's temporary one or Ray Train's
  copy into storage, makes the kill mid-write) and the step its training loop had finished
  (read from its memory by py-spy) are the state it died in; nothing in the worker is changed.
  Each restart logs the step it restored (``worker_group_start_step``); right after each kill
  the checkpoints in storage that verify whole are listed, registered by Ray Train or not.
- ``full_disk_resume`` (root): the same run with ``run.storage_path`` on a tmpfs that holds two
  checkpoints but not three; the run must stop with an error that says the disk is full, and,
  the tmpfs grown, ``train.run(resume=True)`` must continue from the last good checkpoint.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# A checkpoint's files, final or under bitlm's temporary names (bitlm/checkpoint.py).
_CKPT_FILE = re.compile(r"/\.?(config\.json|model\.safetensors|training_state\.pt)(\.tmp-\d+)?$")
MODEL = {"model.d_model": 256, "model.num_layers": 4, "model.dim_feedforward": 1024}


def _config(work: Path, storage: Path, steps: int, every: int, max_failures: int):
    from bitlm import load_config
    from bitlm.config import apply_overrides

    return apply_overrides(
        load_config(ROOT / "configs" / "tiny.yaml"),
        {**MODEL, "data.output_dir": str(work / "data"), "run.storage_path": str(storage),
         "train.max_steps": steps, "train.max_seconds": None, "train.batch_size": 2, "train.log_every": every,
         "train.eval_every": 1000, "run.checkpoint_every": every, "run.keep_checkpoints": 2,
         "run.max_failures": max_failures, "run.system_metrics_seconds": 0},
    )  # fmt: skip


def _start(work: Path) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    from pipelines.common import init_ray

    init_ray(quiet=True)


def _history(client, run_id: str, key: str) -> list[tuple[int, float, int]]:
    """(timestamp ms, value, step) of a metric, oldest first."""
    return sorted((m.timestamp, m.value, m.step) for m in client.get_metric_history(run_id, key))


def _run_id(client, name: str) -> str | None:
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], f"tags.ray_run_name = '{name}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def _worker_pids(exclude: set[int]) -> list[int]:
    """The pids of the live Ray Train workers of this process's own Ray cluster: processes
    titled ``ray::RayTrainWorker`` below this one (its raylet is a child of this driver; other
    clusters on the machine are not)."""
    parent, title = {}, {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            title[int(d.name)] = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return [p for p, t in title.items() if t.startswith("ray::RayTrainWorker") and p not in exclude and ours(p)]


def _open_checkpoint_files(pid: int) -> list[str]:
    """The checkpoint files the process holds open now (read from /proc: nothing is changed)."""
    out = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if _CKPT_FILE.search(target):
            out.append(target)
    return out


class _Killer:
    """SIGKILLs the run's checkpoint writer (rank 0: the worker seen writing a checkpoint) once
    per mode in ``modes``, each time once the (re)started group has begun its first checkpoint
    write: ``random``, at a random moment of the next ``window`` seconds (about one interval);
    ``aimed``, within the next ``aim`` seconds (about one write)."""

    def __init__(self, client, name: str, run_dir: Path, modes: list[str], window: float, aim: float, seed: int):
        self.client, self.run_name, self.run_dir, self.modes = client, name, run_dir, modes
        self.window, self.aim = window, aim
        self.rng = random.Random(seed)
        self.kills: list[dict] = []
        self.temp_dirs: set[str] = set()  # the temporary checkpoint directories the writers used
        self.stop = threading.Event()
        self.failure: str | None = None

    def _group_started(self, run_id: str, starts: int) -> bool:
        """Whether worker group number ``starts`` (1, 2, ...) has started."""
        return len(_history(self.client, run_id, "worker_group_start_step")) >= starts

    def _writer(self, killed: set[int], until: float) -> int | None:
        """The live worker first seen with a checkpoint file open (rank 0), before ``until``."""
        pids, asked = [], 0.0
        while time.time() < until and not self.stop.is_set():
            if time.time() - asked > 0.5:  # the group's workers, as they come up
                pids, asked = _worker_pids(killed), time.time()
            for pid in pids:
                if self._files(pid):
                    return pid
            time.sleep(0.002)
        return None

    def _files(self, pid: int) -> list[str]:
        files = _open_checkpoint_files(pid)
        self.temp_dirs.update(str(Path(f).parent) for f in files if "/checkpoint_" not in f)
        return files

    def run(self) -> None:
        try:
            self._kill_all()
        except Exception as e:  # noqa: BLE001 - reported with the results
            self.failure = f"{type(e).__name__}: {e}"

    def _kill_all(self) -> None:
        run_id, killed = None, set()
        for i, mode in enumerate(self.modes):
            while not self.stop.is_set():
                run_id = run_id or _run_id(self.client, self.run_name)
                if run_id and self._group_started(run_id, i + 1):
                    break
                time.sleep(0.5)
            pid = self._writer(killed, time.time() + 300)
            if pid is None:
                return  # the run ended
            until = time.time() + self.rng.uniform(0, self.aim if mode == "aimed" else self.window)
            while time.time() < until and not self.stop.is_set():
                self._files(pid)
                time.sleep(0.002)
            try:  # frozen, read, then killed: it never runs between what is read and the kill
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            writing, step = self._files(pid), _training_step(pid)
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
            where = sorted(
                {("storage " if "/checkpoint_" in f else "temp ") + re.sub(r"-\d+$", "", Path(f).name) for f in writing}
            )
            at_ms = int(time.time() * 1000)
            self.kills.append({"mode": mode, "at_ms": at_ms, "mid_write": bool(writing), "writing": where,
                               "step": step, "complete_in_storage": _complete_steps(self.run_dir)})  # fmt: skip


def _training_step(pid: int) -> int | None:
    """The last step the worker finished: the ``step`` local of pipelines/worker.py's training
    loop, read from the (stopped) process's memory by py-spy; None when it cannot be read."""
    spy = Path(sys.executable).with_name("py-spy")
    try:
        out = subprocess.run([str(spy), "dump", "--pid", str(pid), "--locals", "--nonblocking"],
                             capture_output=True, text=True, timeout=30).stdout  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"\s*_train \(.*worker\.py:\d+\)", line):
            indent = len(line) - len(line.lstrip())
            for inner in lines[i + 1 :]:
                if len(inner) - len(inner.lstrip()) <= indent:
                    break
                found = re.match(r"\s+step: (\d+)$", inner)
                if found:
                    return int(found.group(1))
    return None


def _complete_steps(run_dir: Path) -> list[int]:
    """The steps of the checkpoints in a run's storage that verify whole (bitlm's SHA-256s of
    the weights and the training state), registered by Ray Train or not."""
    from bitlm.checkpoint import CheckpointError, load_training_state, read_checkpoint

    steps = []
    for d in sorted(run_dir.glob("checkpoint_*")):
        try:
            read_checkpoint(d)
            state = load_training_state(d)
        except (CheckpointError, OSError):
            continue
        if state is not None:
            steps.append(int(state["step"]))
    return steps


def _resumes(client, run_id: str, kills: list[dict], every: int) -> list[dict]:
    """Per kill: the step reached (read from the worker as it was killed; else the last step in
    the store, a lower bound: rank 0 sends its metrics every ``train.log_every`` steps), the step
    the next worker group restored, the steps redone, and the newest checkpoint whole in
    storage right after the kill (registered by Ray Train or not)."""
    starts = _history(client, run_id, "worker_group_start_step")
    bpb = _history(client, run_id, "bpb")
    out = []
    for k in kills:
        stored = max((step for ts, _, step in bpb if ts <= k["at_ms"]), default=0)
        reached = k["step"] if k["step"] is not None else stored
        resumed = next((int(v) for ts, v, _ in starts if ts > k["at_ms"]), None)
        out.append({"mode": k["mode"], "mid_write": k["mid_write"], "writing": k["writing"], "reached_step": reached,
                    "reached_from": "worker" if k["step"] is not None else "store (lower bound)",
                    "last_step_in_store": stored, "resumed_from_step": resumed,
                    "steps_redone": reached - resumed if resumed is not None else None,
                    "newest_whole_checkpoint_in_storage": max(k["complete_in_storage"], default=None)})  # fmt: skip
    return out


def killed_worker_resume(kills: int, steps: int, every: int, work: Path) -> dict:
    """One Ray Train run whose worker is SIGKILLed ``kills`` times (see the module docstring)."""
    from pipelines import train

    _start(work)
    storage = work / "ray"
    cfg = _config(work, storage, steps, every, max_failures=kills + 2)
    client = __import__("mlflow.tracking", fromlist=["MlflowClient"]).MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    modes = ["random" if i % 2 == 0 else "aimed" for i in range(kills)]
    killer = _Killer(client, "killed-worker", storage / "killed-worker", modes, window=3.0, aim=0.15, seed=0)
    thread = threading.Thread(target=killer.run, daemon=True)
    thread.start()
    start = time.time()
    try:
        out = train.run(cfg, name="killed-worker")
        finished, error = True, None
    except Exception as e:  # noqa: BLE001 - reported
        out, finished, error = None, False, f"{type(e).__name__}: {e}"[:2000]
    killer.stop.set()
    thread.join(timeout=30)
    run_id = out["run_id"] if out else _run_id(client, "killed-worker")
    resumes = _resumes(client, run_id, killer.kills, every)
    left = sorted(d for d in killer.temp_dirs if Path(d).exists())
    for d in left:  # what the killed writers left in the temporary directory (their own files)
        shutil.rmtree(d, ignore_errors=True)
    redone = [r["steps_redone"] for r in resumes if r["steps_redone"] is not None]
    return {
        "checkpoint_every": every,
        "checkpoint_MB": _checkpoint_mb(storage / "killed-worker"),
        "run_seconds": round(time.time() - start, 1),
        "finished": finished,
        "error": error,
        "steps": int(out["metrics"]["step"]) if out else None,
        "steps_expected": steps,
        "kills_requested": kills,
        "kills": len(resumes),
        "kills_mid_write": sum(r["mid_write"] for r in resumes),
        "resumes": resumes,
        "max_steps_redone": max(redone, default=None),
        "resumed_from_older_than_newest_whole": sum(
            r["resumed_from_step"] is not None and (r["newest_whole_checkpoint_in_storage"] or 0) > r["resumed_from_step"]
            for r in resumes
        ),
        "every_resume_within_one_interval": bool(redone) and len(redone) == len(resumes)
        and all(0 <= r <= every for r in redone),
        "worker_group_starts": len(_history(client, run_id, "worker_group_start_step")),
        "temp_dirs_left_by_killed_writers": len(left),
        "killer_failure": killer.failure,
    }  # fmt: skip


def _checkpoint_mb(run_dir: Path) -> float | None:
    ckpts = sorted(p for p in run_dir.glob("checkpoint_*") if (p / "config.json").is_file())
    if not ckpts:
        return None
    return round(sum(f.stat().st_size for f in ckpts[-1].iterdir()) / 2**20, 1)


def full_disk_resume(steps: int, every: int, work: Path) -> dict:
    """A run whose storage fills during its third checkpoint, then resumed with space."""
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a small tmpfs"}
    from pipelines import train

    _start(work)
    storage = work / "small-disk"
    storage.mkdir()
    ckpt_mb = 40  # MODEL's checkpoint (weights + optimizer) is ~40 MB: two fit, three do not
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(2.6 * ckpt_mb)}m", "tmpfs", str(storage)], check=True)
    client = __import__("mlflow.tracking", fromlist=["MlflowClient"]).MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    cfg = _config(work, storage, steps, every, max_failures=0)
    try:
        start = time.time()
        try:
            train.run(cfg, name="full-disk")
            error = None
        except Exception as e:  # noqa: BLE001 - the expected stop, reported
            error = f"{type(e).__name__}: {e}"
        stopped_s = round(time.time() - start, 1)
        run_id = _run_id(client, "full-disk")
        reached = max((step for _, _, step in _history(client, run_id, "bpb")), default=0)
        usage = shutil.disk_usage(storage)
        subprocess.run(["mount", "-o", "remount,size=1g", str(storage)], check=True)  # space again
        stopped_at_ms = int(time.time() * 1000)
        try:
            out = train.run(cfg, name="full-disk", resume=True)
            resumed_ok, resume_error = True, None
        except Exception as e:  # noqa: BLE001 - reported
            out, resumed_ok, resume_error = None, False, f"{type(e).__name__}: {e}"[:2000]
        starts = [(ts, int(v)) for ts, v, _ in _history(client, run_id, "worker_group_start_step")]
        resumed = next((v for ts, v in starts if ts > stopped_at_ms), None)
        return {
            "disk_MB": int(2.6 * ckpt_mb),
            "checkpoint_every": every,
            "stopped": error is not None,
            "error": _short(error),
            "error_says_disk_full": error is not None and "No space left on device" in error,
            "seconds_to_stop": stopped_s,
            "disk_used_MB_at_stop": round(usage.used / 2**20, 1),
            "reached_step": reached,
            "resumed": resumed_ok,
            "resume_error": resume_error,
            "resumed_from_step": resumed,
            "steps_redone": reached - resumed if resumed is not None else None,
            "steps_after_resume": int(out["metrics"]["step"]) if out else None,
            "steps_expected": steps,
        }
    finally:
        subprocess.run(["umount", "--lazy", str(storage)], check=False)


def _short(error: str | None) -> str | None:
    """The lines of a (Ray-wrapped) error that say what failed, without its tracebacks."""
    if error is None:
        return None
    keep = [ln.strip() for ln in error.splitlines() if re.search(r"Error|No space|failed", ln)]
    return " | ".join(dict.fromkeys(keep))[:1500]
