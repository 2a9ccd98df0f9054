"""Quality at equal CPU time: byte-level GPT vs arch="bit" vs arch="byte_patch".

    python benchmarks/quality.py [--minutes 5] [--out benchmarks/results/quality.json]

One after another, on the same split of the built-in corpus (the last 10% held out) and the
same wall-clock budget, each model trains with the same optimizer, batch, window and
schedule: (a) a plain byte-level GPT (256-way softmax; benchmarks/byte_gpt.py), (b)
BitTransformerLM(arch="bit"), (c) BitTransformerLM(arch="byte_patch"), all at the same
d_model and depth. Reported in one JSON and one markdown table: validation bits per byte (data
bits), parity bits per byte, parameters, bytes trained per second, generation bytes per second
(KV cache), the training step's FLOP/s as a fraction of this machine's fp32 matmul FLOP/s
measured in the same run, and gzip -9 / bz2 -9 / xz -9e on the same validation bytes (alone
and conditional on the training text). A PNG plots validation bits/byte against training
seconds for the three.

Every model is scored on the same bytes: each validation window's bytes 1..W-1, each given
the bytes before it in its window (byte 0 has no context and is not scored).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from byte_gpt import ByteGPT, ByteObjective, byte_nll  # noqa: E402

from bitlm import BitTransformerLM, TrainConfig, Trainer, builtin_split, bytes_to_bits  # noqa: E402
from bitlm.generate import generate_bits  # noqa: E402
from bitlm.objectives import nll_sums  # noqa: E402
from pipelines.evaluate import compressor_bpb  # noqa: E402

LN2 = math.log(2)
SETUP = dict(d_model=128, nhead=4, num_layers=4, dim_feedforward=512, window=256, batch=16, lr=3e-3, warmup=30)
ARCHS = {
    "byte_gpt": {},
    "bit": {"arch": "bit"},
    "byte_patch": {"arch": "byte_patch", "patch_bytes": 1},
}


def matmul_peak_flops(threads: int) -> float:
    """Best fp32 matmul FLOP/s of this machine with ``threads`` threads (1024^3 GEMMs)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * 1024**3 / (time.perf_counter() - t))
    return best


def build(kind: str, s: dict, extra: dict | None = None):
    if kind == "byte_gpt":
        return ByteGPT(s["d_model"], s["nhead"], s["num_layers"], s["dim_feedforward"], s["window"])
    cfg = dict(
        d_model=s["d_model"],
        nhead=s["nhead"],
        num_layers=s["num_layers"],
        dim_feedforward=s["dim_feedforward"],
        max_seq_len=9 * s["window"],
        dropout=0.0,
    )
    return BitTransformerLM(**cfg, **{**ARCHS[kind], **(extra or {})})


def step_flops(kind: str, model, s: dict) -> float:
    """Training FLOPs of one step: 6 * (matmul parameters) per position, plus attention
    (12 * layers * positions * d per position, as in nanoGPT's estimate), times positions."""
    B, W, d, L = s["batch"], s["window"], s["d_model"], s["num_layers"]
    block = sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2)
    if kind == "byte_gpt":
        positions, head = W, 256 * d
        return B * positions * (6 * (block + head) + 12 * L * positions * d)
    if kind == "bit":
        positions = 9 * W
        return B * positions * (6 * (block + 2 * d) + 12 * L * positions * d)
    positions = W // model.config.patch_bytes + 1
    return B * (positions * (6 * block + 12 * L * positions * d) + W * 6 * 255 * d)


def score(kind: str, model, windows: np.ndarray) -> dict[str, float]:
    """bits/byte (and parity bits/byte) on bytes 1..W-1 of each window."""
    model.eval()
    data_bits, parity_bits, n_bytes = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 32):
            x = torch.from_numpy(windows[i : i + 32]).long()
            if kind == "byte_gpt":
                data_bits += float(byte_nll(model(x[:, :-1]), x[:, 1:]).sum()) / LN2
            else:
                bits = torch.from_numpy(bytes_to_bits(windows[i : i + 32])).long()
                sums = nll_sums(model(bits, telemetry=False)[0], bits, from_byte=1)
                data_bits += sums["data_bits"]
                parity_bits += sums["parity_bits"]
            n_bytes += x.size(0) * (x.size(1) - 1)
    model.train()
    return {"bpb": data_bits / n_bytes, "parity_bpb": parity_bits / n_bytes}


def generation_speed(kind: str, model, prompt: np.ndarray, n: int = 128) -> float:
    model.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        t = time.perf_counter()
        if kind == "byte_gpt":
            model.generate(torch.from_numpy(prompt[None]).long(), n, g)
        else:
            generate_bits(model, torch.from_numpy(bytes_to_bits(prompt)).long()[None], n, generator=g)
        return n / (time.perf_counter() - t)


def train_one(
    kind: str, s: dict, seconds: float, train: np.ndarray, val: np.ndarray, seed: int = 0, extra: dict | None = None
) -> dict:
    torch.manual_seed(seed)
    model = build(kind, s, extra)
    # The one optimizer step (bitlm.trainer) and, for the bit models, the one objective.
    cfg = TrainConfig(
        lr=s["lr"], min_lr=0.1 * s["lr"], warmup_steps=s["warmup"], lr_schedule="cosine", weight_decay=0.1
    )
    trainer = Trainer(model, cfg, objective=ByteObjective() if kind == "byte_gpt" else None)
    rng = np.random.default_rng(seed)
    W, B = s["window"], s["batch"]
    curve_windows = val[np.linspace(0, len(val) - 1, 48).astype(int)]
    curve, step, trained_s, next_eval = [], 0, 0.0, 0.0
    while trained_s < seconds:
        if trained_s >= next_eval:
            curve.append({"seconds": trained_s, "step": step, **score(kind, model, curve_windows)})
            next_eval += seconds / 10
        starts = rng.integers(0, len(train) - W, B)
        batch = train[starts[:, None] + np.arange(W)]
        t = time.perf_counter()
        x = torch.from_numpy(batch if kind == "byte_gpt" else bytes_to_bits(batch)).long()
        trainer.train_step([x], progress=trained_s / seconds)
        trained_s += time.perf_counter() - t
        step += 1
    final = score(kind, model, val)
    curve.append({"seconds": trained_s, "step": step, **score(kind, model, curve_windows)})
    flops = step_flops(kind, model, s)
    return {
        "model": kind,
        "extra": extra or {},
        "parameters": model.num_parameters(),
        "steps": step,
        "seconds": trained_s,
        "val_bpb": final["bpb"],
        "parity_bpb": final["parity_bpb"],
        "train_bytes_per_s": step * B * W / trained_s,
        "step_flops": flops,
        "achieved_flops_per_s": flops * step / trained_s,
        "gen_bytes_per_s": generation_speed(kind, model, val[0][:64]),
        "curve": curve,
    }


def plot(results: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([c["seconds"] for c in r["curve"]], [c["bpb"] for c in r["curve"]], marker="o", ms=3, label=r["label"])
    ax.set_xlabel("training seconds (2 CPU cores)")
    ax.set_ylabel("validation bits per byte")
    ax.set_ylim(top=8)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(result: dict) -> str:
    rows = [
        "| model | params | val bits/byte | parity bits/byte | train bytes/s | gen bytes/s | MFU |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        rows.append(
            f"| {r['label']} | {r['parameters']:,} | {r['val_bpb']:.3f} | {r['parity_bpb']:.3f} | "
            f"{r['train_bytes_per_s']:,.0f} | {r['gen_bytes_per_s']:,.0f} | {r['mfu']:.1%} |"
        )
    for name, v in result["compressors"].items():
        rows.append(f"| {name} (alone / given train) | | {v['alone']:.3f} / {v['conditional']:.3f} | | | | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0, help="training budget per model")
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--models", default="byte_gpt,bit,byte_patch")
    ap.add_argument("--patch-bytes", type=int, default=4, help="byte_patch's patch size")
    ap.add_argument(
        "--local-decoder", default="softmax", choices=["softmax", "tree"], help="byte_patch's local decoder"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--d-model",
        type=int,
        default=SETUP["d_model"],
        help="width of every model (feed-forward 4x); for MFU at d>=256",
    )
    args = ap.parse_args(argv)
    setup = {**SETUP, "d_model": args.d_model, "dim_feedforward": 4 * args.d_model}
    torch.set_num_threads(args.threads)
    peak = matmul_peak_flops(args.threads)
    train_b, val_b = builtin_split()
    train = np.frombuffer(train_b, dtype=np.uint8)
    val_arr = np.frombuffer(val_b, dtype=np.uint8)
    W = setup["window"]
    val = val_arr[: len(val_arr) // W * W].reshape(-1, W)
    results = []
    for kind in args.models.split(","):
        extra = {"patch_bytes": args.patch_bytes, "local_decoder": args.local_decoder} if kind == "byte_patch" else None
        r = train_one(kind, setup, args.minutes * 60, train, val, extra=extra)
        r["mfu"] = r["achieved_flops_per_s"] / peak
        r["label"] = kind if kind != "byte_patch" else f"byte_patch (P={args.patch_bytes}, {args.local_decoder})"
        results.append(r)
        print(
            f"{r['label']}: val {r['val_bpb']:.3f} bpb, parity {r['parity_bpb']:.3f}, {r['train_bytes_per_s']:,.0f} bytes/s, {r['steps']} steps",
            flush=True,
        )
    scored = val[:, 1:].tobytes()
    result = {
        "setup": {**setup, "minutes_per_model": args.minutes, "threads": args.threads},
        "matmul_peak_flops_per_s": peak,
        "models": results,
        "compressors": compressor_bpb(scored, train_b),
    }
    by = {r["model"]: r for r in results}
    if "byte_gpt" in by and "byte_patch" in by:
        result["goals"] = {
            "byte_patch_bpb_vs_byte_gpt": by["byte_patch"]["val_bpb"] / by["byte_gpt"]["val_bpb"],
            "byte_patch_bpb_le_byte_gpt": by["byte_patch"]["val_bpb"] <= by["byte_gpt"]["val_bpb"],
            "byte_patch_parity_le_0.01": by["byte_patch"]["parity_bpb"] <= 0.01,
            "byte_patch_train_speed_vs_byte_gpt": by["byte_patch"]["train_bytes_per_s"]
            / by["byte_gpt"]["train_bytes_per_s"],
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    plot(results, out.with_suffix(".png"))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
