"""Quality and speed of fp32, int8-dynamic and 4-bit-QAT models of the demo config, one run.

The demo config trains for ``--seconds``; then one copy trains on in fp32 and one with 4-bit
QAT for ``--qat-seconds`` each (the same budget), so the two end with equal training. Reported:
validation bits/byte on the whole held-out split for fp32, int8 (of the fp32 model) and the
converted 4-bit model, generation bytes/s with the KV cache, weight bytes, and the speed of
fp32 vs int8 at d_model 256 and 512 (forward over a batch, and generation).

    python benchmarks/quantization.py --out benchmarks/results/quantization.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bitlm import BitTransformerLM, builtin_split, byte_windows, evaluate, load_config, train_loop
from bitlm.generate import generate_bits
from bitlm.quantization import convert_qat_fx, prepare_qat_fx, quantize_dynamic, quantized_bytes

ROOT = Path(__file__).resolve().parent.parent


def gen_speed(model, prompt, n=24) -> float:
    generate_bits(model, prompt, 2, temperature=1.0)
    t = time.perf_counter()
    generate_bits(model, prompt, n, temperature=1.0, generator=torch.Generator().manual_seed(0))
    return n / (time.perf_counter() - t)


def forward_speed(model, batch, repeats=3) -> float:
    with torch.no_grad():
        model(batch)
        t = time.perf_counter()
        for _ in range(repeats):
            model(batch)
    return batch.numel() * repeats / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/quantization.json")
    ap.add_argument("--config", default="small.yaml")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--qat-seconds", type=float, default=45)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = load_config(ROOT / "configs" / args.config)
    train, val = builtin_split()
    train_w = torch.from_numpy(byte_windows(train, cfg.data.window_bytes)).long()
    val_w = torch.from_numpy(byte_windows(val, cfg.data.window_bytes)).long()
    opts = dict(
        epochs=100,
        batch_size=cfg.train.batch_size,
        lr=cfg.train.lr,
        warmup_steps=cfg.train.warmup_steps,
        weight_decay=cfg.train.weight_decay,
    )
    model = BitTransformerLM(config=cfg.model)
    train_loop(model, train_w, max_seconds=args.seconds, **opts)
    fp32, qat = model, prepare_qat_fx(copy.deepcopy(model))
    tail = dict(opts, lr=cfg.train.lr / 3, warmup_steps=0)
    train_loop(fp32, train_w, max_seconds=args.qat_seconds, seed=1, **tail)
    train_loop(qat, train_w, max_seconds=args.qat_seconds, seed=1, **tail)
    fp32.eval()
    variants = {"fp32": fp32, "int8": quantize_dynamic(fp32), "int4_qat": convert_qat_fx(qat)}
    prompt = val_w[:1, : 9 * 32]
    rows = {}
    for name, m in variants.items():
        rows[name] = {
            "val_bpb": evaluate(m, val_w, batch_size=32)["val_bpb"],
            "weight_bytes": quantized_bytes(m),
            "gen_bytes_per_s": gen_speed(m, prompt),
        }
    for name in ("int8", "int4_qat"):
        rows[name]["bpb_cost"] = rows[name]["val_bpb"] - rows["fp32"]["val_bpb"]
        rows[name]["gen_speed_vs_fp32"] = rows[name]["gen_bytes_per_s"] / rows["fp32"]["gen_bytes_per_s"]
    speed = {}
    for d in (128, 256, 512):
        m = BitTransformerLM(
            d_model=d, nhead=4, num_layers=4, dim_feedforward=4 * d, max_seq_len=576, dropout=0.0
        ).eval()
        q = quantize_dynamic(m)
        batch = torch.randint(0, 2, (16, 576))
        speed[d] = {
            "forward_int8_vs_fp32": forward_speed(q, batch) / forward_speed(m, batch),
            "generation_int8_vs_fp32": gen_speed(q, prompt) / gen_speed(m, prompt),
        }
    result = {
        "config": args.config,
        "train_seconds": args.seconds,
        "qat_seconds": args.qat_seconds,
        "quality": rows,
        "speed_by_d_model": speed,
        "goals": {
            "int8_cost_le_0.02_bpb": rows["int8"]["bpb_cost"] <= 0.02,
            "int8_faster_at_d256": speed[256]["forward_int8_vs_fp32"] > 1.0,
            "int4_qat_cost_le_0.1_bpb": rows["int4_qat"]["bpb_cost"] <= 0.1,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
