"""The demo on embedded defaults: train the small config on the built-in corpus for a couple of
minutes, then print loss, bits-per-byte, K/C/S and a generated sample.

    python pipelines/demo.py [--config configs/small.yaml] [--set train.max_seconds=60]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bitlm import BitTransformerLM, builtin_split, byte_windows, evaluate, load_config, sample_text, train_loop  # noqa: E402
from bitlm.config import dump_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    ap.add_argument("--out", default="runs/demo", help="where the checkpoint is written")
    args = ap.parse_args()
    cfg = load_config(args.config, args.set)
    print(dump_config(cfg))
    torch.manual_seed(cfg.train.seed)
    train, val = builtin_split(cfg.data.val_fraction)
    train_w = torch.from_numpy(byte_windows(train, cfg.data.window_bytes, cfg.data.stride_bytes)).long()
    val_w = torch.from_numpy(byte_windows(val, cfg.data.window_bytes)).long()
    print(f"built-in corpus: {len(train):,} train bytes ({len(train_w)} windows), {len(val):,} validation bytes")
    model = BitTransformerLM(config=cfg.model)
    print(f"model: {model.num_parameters():,} parameters, arch={cfg.model.arch}")
    start = time.perf_counter()
    train_args = {
        k: v
        for k, v in vars(cfg.train).items()
        if k not in ("epochs", "batch_size", "accum_steps", "amp", "compile_model")
    }
    history = train_loop(
        model,
        train_w,
        epochs=cfg.train.epochs,
        batch_size=cfg.train.batch_size,
        accum_steps=cfg.train.accum_steps,
        amp=cfg.train.amp,
        compile_model=cfg.train.compile_model,
        log=True,
        val_data=val_w,
        **train_args,
    )
    seconds = time.perf_counter() - start
    final = evaluate(model, val_w, batch_size=32)
    last = history.steps[-1]
    print(
        f"\ntrained {last['step']} steps in {seconds:.0f} s ({last['step'] * train_w[0].numel() * cfg.train.batch_size / 9 / seconds:,.0f} bytes/s)"
    )
    print(f"train loss {last['loss']:.4f}   K {last['K']:.3f}   C {last['C']:.3f}   S {last['S']:.3f}")
    print(f"validation bits/byte {final['val_bpb']:.3f}   parity bits/byte {final['val_parity_bpb']:.3f}")
    model.save_pretrained(Path(args.out) / "checkpoint")
    prompt = "The return statement"
    print(f"\nsample: {prompt!r} -> {sample_text(model, prompt, 120, temperature=0.7, seed=0)!r}")
    print(f"checkpoint: {Path(args.out) / 'checkpoint'}")


if __name__ == "__main__":
    main()
