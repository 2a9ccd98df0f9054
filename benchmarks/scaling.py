"""Progressive scaling at equal compute: is growing a small model on plateau cheaper than
training the large one from the start?

    python benchmarks/scaling.py [--minutes 3] [--out benchmarks/results/scaling.json]

Three Tune sweeps of one trial each, one after another, each with the same training-time
budget (``train.max_seconds``): (a) the small model trained throughout (FIFO), (b) the large
model (4x: double depth and width) from the start (FIFO), (c) the small model grown by
tune/scaling.py's scheduler on plateau (depth, then width). Validation bits/byte is plotted
against training seconds and training FLOPs (6 x parameters x transformer positions, summed
over steps with the size each step had).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMALL = ["model.d_model=64", "model.num_layers=2", "model.dim_feedforward=256"]
LARGE = ["model.d_model=128", "model.num_layers=4", "model.dim_feedforward=512"]


def run_variant(label: str, overrides: list[str], scheduler: dict, minutes: float, tmp: str) -> dict:
    from mlflow.tracking import MlflowClient

    from bitlm.config import from_dict
    from bitlm.sweep_config import SweepConfig
    from tune import sweep as sweep_mod

    sweep = from_dict(
        SweepConfig,
        {
            "name": f"scaling-{label}",
            "base": "configs/small.yaml",
            "storage_path": f"{tmp}/tune",
            "scheduler": scheduler,
            "num_samples": 1,
            "max_concurrent_trials": 1,
        },
    )
    base = [*overrides, f"train.max_seconds={minutes * 60}", "train.max_steps=null", "train.epochs=1000",
            "train.eval_every=20", "train.log_every=10", "run.num_workers=1", "run.threads_per_worker=2",
            "run.checkpoint_every=20", f"data.output_dir={tmp}/data"]  # fmt: skip
    out = sweep_mod.run_sweep(sweep, name=label, base_overrides=base)
    row = out["rows"][0]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    hist = {
        k: {m.step: m.value for m in client.get_metric_history(row["run_id"], k)}
        for k in ("val_bpb", "seconds", "model_params", "bits")
    }
    return {"label": label, "growths": row["growths"], "history": hist}


def curve(variant: dict, positions_per_step: float) -> list[dict]:
    """(step, seconds, FLOPs, val bpb) at each evaluation."""
    h = variant["history"]
    flops, points, last_params = 0.0, [], None
    for step in sorted(h["seconds"]):
        last_params = h["model_params"].get(step, last_params)
        flops += 6 * (last_params or 0) * positions_per_step
        if step in h["val_bpb"]:
            points.append({"step": step, "seconds": h["seconds"][step], "flops": flops, "val_bpb": h["val_bpb"][step]})
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    from bitlm import load_config

    cfg = load_config(ROOT / "configs" / "small.yaml")
    positions = cfg.train.batch_size * (cfg.data.window_bytes // cfg.model.resolved().patch_bytes + 1)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        grow = {
            "type": "scaling",
            "patience": 2,
            "min_delta": 0.02,
            "strategies": ["depth", "width"],
            "max_params": 2_000_000,
        }
        variants = [
            run_variant("small", SMALL, {"type": "fifo"}, args.minutes, tmp),
            run_variant("large", LARGE, {"type": "fifo"}, args.minutes, tmp),
            run_variant("grown", SMALL, grow, args.minutes, tmp),
        ]
    result = {"minutes_per_variant": args.minutes, "positions_per_step": positions, "variants": []}
    for v in variants:
        points = curve(v, positions)
        result["variants"].append(
            {
                "label": v["label"],
                "growths": v["growths"],
                "final_val_bpb": points[-1]["val_bpb"] if points else None,
                "total_flops": points[-1]["flops"] if points else None,
                "curve": points,
            }
        )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for v in result["variants"]:
        for ax, key in zip(axes, ("seconds", "flops")):
            ax.plot(
                [p[key] for p in v["curve"]],
                [p["val_bpb"] for p in v["curve"]],
                marker="o",
                ms=3,
                label=f"{v['label']} {'+'.join(v['growths'])}",
            )
    axes[0].set_xlabel("training seconds")
    axes[1].set_xlabel("training FLOPs")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation bits/byte")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out.with_suffix(".png"), dpi=100)
    by = {v["label"]: v for v in result["variants"]}
    result["goals"] = {
        "grown_vs_small_final_bpb": by["grown"]["final_val_bpb"] - by["small"]["final_val_bpb"],
        "grown_vs_large_final_bpb": by["grown"]["final_val_bpb"] - by["large"]["final_val_bpb"],
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: v for k, v in result.items() if k != "variants"}
            | {"final": {v["label"]: v["final_val_bpb"] for v in result["variants"]}},
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
