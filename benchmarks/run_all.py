"""Run every benchmark, one after another (they would disturb each other's timings), and
collect their JSON into one summary.

    python benchmarks/run_all.py --out benchmarks/results [--quick] [--only core,memory]

Each benchmark is its own script with its own --help. ``--quick`` shortens the long ones
(training budgets, soak) for a smoke run; the figures quoted in the README come from a full run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHMARKS = {
    "core": ("core.py", [], ["--steps", "3"]),
    "memory": ("memory.py", [], ["--depths", "4,8"]),
    "quantization": ("quantization.py", [], ["--seconds", "20", "--qat-seconds", "10"]),
    "platform": ("platform_throughput.py", [], ["--copies", "20", "--steps", "20"]),
    "scale": (
        "scale.py",
        [],
        "--corpus-mb 8 --one-file-mb 4 --one-file-chunk-bytes 262144 --steps 5 --eval-max-bytes 16384".split(),
    ),
    "quality": ("quality.py", [], ["--minutes", "0.5"]),
    "gen_speed": ("gen_speed.py", [], ["--repeats", "3", "--new-bytes", "64"]),
    "scaling": ("scaling.py", [], ["--minutes", "1"]),
    "serve": ("serve_bench.py", [], ["--soak-seconds", "20"]),
    "serve_overhead": ("serve_overhead.py", [], ["--pairs", "3"]),
    "fuzz": ("fuzz.py", [], ["--max-examples", "10"]),
    "cluster": ("cluster.py", [], ["--steps", "40"]),  # needs root (network namespaces)
    "gate": ("gate.py", [], ["--seconds", "20", "--n", "10"]),
    "faults": (
        "faults.py",
        [],
        "--outage-seconds 10 --kills 4 --steps 150 --resume-kills 2 --resume-steps 100 --replica-rounds 1 "
        "--hostile-cases 1000".split(),
    ),  # the full disk needs root
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", help="comma-separated subset of: " + ",".join(BENCHMARKS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    summary = {}
    for name in names:
        script, full, quick = BENCHMARKS[name]
        target = out / f"{name}.json"
        cmd = [sys.executable, str(HERE / script), "--out", str(target), *(quick if args.quick else full)]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        start = time.time()
        done = subprocess.run(cmd)
        summary[name] = {"seconds": round(time.time() - start, 1), "exit_code": done.returncode, "result": str(target)}
        if done.returncode == 0 and target.exists():
            summary[name]["goals"] = json.loads(target.read_text()).get("goals")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if any(s["exit_code"] for s in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
