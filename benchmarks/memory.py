"""Peak training memory of reversible vs standard vs checkpointed models at depth 4, 8, 16.

Each (mode, depth) runs in a fresh subprocess whose allocator returns freed memory to the
kernel at once (glibc: every allocation of 64 KiB or more is its own mapping, no trimming
delay), so resident memory follows live tensors. It builds the model and a batch, runs a
warm-up step, resets the kernel's peak-RSS mark (/proc/self/clear_refs), runs one
forward+backward+optimizer step, and reports the peak RSS above the level just before it. Same width, sequence and batch everywhere.
Time per step is measured in the same processes (second step, after the warm-up step).

    python benchmarks/memory.py --out benchmarks/results/memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SETUP = dict(d_model=128, nhead=4, dim_feedforward=512, seq_bits=1152, batch=8)
MODES = {"standard": {}, "checkpointed": {"use_checkpoint": True}, "reversible": {"reversible": True}}


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def measure(mode: str, depth: int) -> dict:
    """Run in the child process: one warm-up step, then a measured step."""
    import torch

    from bitlm import BitTransformerLM, TrainConfig, Trainer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = BitTransformerLM(
        d_model=SETUP["d_model"],
        nhead=SETUP["nhead"],
        num_layers=depth,
        dim_feedforward=SETUP["dim_feedforward"],
        max_seq_len=SETUP["seq_bits"],
        dropout=0.0,
        **MODES[mode],
    )
    trainer = Trainer(model, TrainConfig(lr=1e-3))
    batch = torch.randint(0, 2, (SETUP["batch"], SETUP["seq_bits"]))
    trainer.train_step([batch])  # optimizer state allocated, allocator warmed up
    before = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    trainer.train_step([batch])
    seconds = time.perf_counter() - t
    peak = _status()["VmHWM"]
    return {
        "mode": mode,
        "depth": depth,
        "peak_step_bytes": peak - before,
        "seconds_per_step": seconds,
        "parameters": model.num_parameters(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "DEPTH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]))))
        return
    rows = []
    for depth in map(int, args.depths.split(",")):
        for mode in MODES:
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(depth)],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"depth {depth:2d} {mode:12s} peak {rows[-1]['peak_step_bytes'] / 2**20:8.1f} MiB  {rows[-1]['seconds_per_step']:.2f} s/step",
                flush=True,
            )
    table = {}
    for depth in sorted({r["depth"] for r in rows}):
        by = {r["mode"]: r for r in rows if r["depth"] == depth}
        std = by["standard"]
        table[depth] = {
            mode: {
                "peak_MiB": r["peak_step_bytes"] / 2**20,
                "memory_vs_standard": r["peak_step_bytes"] / std["peak_step_bytes"],
                "time_vs_standard": r["seconds_per_step"] / std["seconds_per_step"],
            }
            for mode, r in by.items()
        }
    deepest = table[max(table)]
    result = {
        "setup": SETUP,
        "method": "peak RSS above the pre-step level during one training step, fresh process per row",
        "rows": rows,
        "table": table,
        "goal_reversible_le_0.6x_standard_at_deepest": deepest["reversible"]["memory_vs_standard"] <= 0.6,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
