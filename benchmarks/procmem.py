"""Memory of a subprocess and everything it starts (a Ray cluster's processes), read from
/proc while it runs: the machine's memory in use, shared memory, the process tree's PSS by
kind of process, and the RSS of Ray Train's workers. Used by benchmarks/scale.py."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

MB = 1e6


def _machine_used() -> tuple[int, int]:
    """(bytes in use on the machine: MemTotal - MemAvailable, of which shared memory). Page
    cache that can be dropped is available; Ray's object store, in /dev/shm, is shared memory."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":")
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"], info["Shmem"]


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        out[int(d)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd.strip())
    return out


def _tree(root: int, procs: dict[int, tuple[int, str]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _title(cmd: str) -> str:
    """A process's kind: its Ray title (ray::TrainController), else its program's name."""
    words = cmd.split(" ")
    if words[0].startswith("ray::"):
        return words[0].split(".")[0]
    if words[0].startswith("ray-dashboard-"):
        return "ray-dashboard-*Head"
    if Path(words[0]).name.startswith("python"):
        return next((Path(w).name for w in words[1:] if w.endswith(".py")), "python")
    return Path(words[0]).name


def _kb(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(
    name: str, cmd: list[str], env: dict, log: Path, cwd: Path | None = None, interval: float = 0.2
) -> dict:
    """Run ``cmd``; sample the machine's memory every ``interval`` s, the process tree's PSS and
    the RayTrainWorker processes' RSS every 1 s. The baseline is the median over 1 s before.
    At the tree's peak its PSS is kept by kind of process (Ray's own processes are most of it)."""
    before = []
    for _ in range(5):
        before.append(_machine_used())
        time.sleep(0.2)
    base, base_shm = sorted(before)[2]
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []

    def read():
        with open(log, "w") as f:
            for line in proc.stdout:
                lines.append((time.time(), line))
                f.write(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak, shm, tree_peak, by_kind, workers, tick = base, base_shm, 0, {}, [], 0
    while proc.poll() is None:
        used = _machine_used()
        peak, shm = max(peak, used[0]), max(shm, used[1])
        if tick % round(1 / interval) == 0:
            procs = _processes()
            pids = _tree(proc.pid, procs)
            pss = {p: _kb(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids}
            if sum(pss.values()) > tree_peak:
                tree_peak, by_kind = sum(pss.values()), {}
                for p, v in pss.items():
                    kind = _title(procs.get(p, (0, "?"))[1])
                    by_kind[kind] = by_kind.get(kind, 0) + v
            now = time.time()
            for p in pids:
                if procs.get(p, (0, ""))[1].startswith("ray::RayTrainWorker"):
                    workers.append((now, p, _kb(f"/proc/{p}/status", "VmRSS:")))
        tick += 1
        time.sleep(interval)
    reader.join(30)
    seconds = time.time() - start
    if proc.returncode:
        tail = "".join(line for _, line in lines[-30:])
        raise SystemExit(f"{name} failed (exit {proc.returncode}); its log {log} ends:\n{tail}")
    return {
        "seconds": round(seconds, 1),
        "machine_baseline_mb": round(base / MB),
        "machine_peak_above_baseline_mb": round((peak - base) / MB),
        "shared_memory_peak_above_baseline_mb": round((shm - base_shm) / MB),
        "process_tree_pss_peak_mb": round(tree_peak / MB),
        "process_tree_pss_at_peak_by_kind_mb": {
            k: round(v / MB) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1]) if v >= 20 * MB
        },
        "_lines": lines,
        "_workers": workers,
    }


def public(step: dict) -> dict:
    return {k: v for k, v in step.items() if not k.startswith("_")}


def machine_load() -> dict:
    """Load average, and the busiest processes (other people's work shows here)."""
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    rows = [line.split(None, 3) for line in ps.splitlines()[1:]]
    top = [" ".join([c, r, a[:70]]) for p, c, r, a in rows if int(p) != os.getpid()][:5]
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "busiest_processes_pcpu_rss_kb_cmd": top}


def end_leftovers(tmp: Path) -> int:
    """End the processes (by pid) whose command line names this run's temp dir; count them."""
    pids = [pid for pid, (_, cmd) in _processes().items() if str(tmp) in cmd and pid != os.getpid()]
    for pid in pids:
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pass
    return len(pids)
