"""Core library speed: codec MB/s, training bits/s of the demo config, generation bytes/s with
and without the KV cache at a 512-byte prompt. Figures are measured in one run; compare them as
ratios (this machine is shared and noisy).

    python benchmarks/core.py --out benchmarks/results/core.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bitlm import BitTransformerLM, Trainer, builtin_corpus, builtin_split, byte_windows, load_config
from bitlm.bits import bits_to_bytes, bytes_to_bits, text_to_bits
from bitlm.generate import generate_bits

ROOT = Path(__file__).resolve().parent.parent


def best_of(fn, repeats: int = 5) -> float:
    """Fastest of ``repeats`` timed calls, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def codec() -> dict:
    text = builtin_corpus()
    data = text.encode("utf-8")
    mb = len(data) / 1e6
    bits = bytes_to_bits(data)
    return {
        "corpus_bytes": len(data),
        "encode_bytes_to_bits_MBps": mb / best_of(lambda: bytes_to_bits(data)),
        "decode_bits_to_bytes_MBps": mb / best_of(lambda: bits_to_bytes(bits)),
        "encode_text_to_bits_list_MBps": mb / best_of(lambda: text_to_bits(text), 2),
        "note": "bytes_to_bits/bits_to_bytes are the numpy paths the data pipeline uses; "
        "text_to_bits returns a Python list (the guide's API) and is bound by list creation",
    }


def training(config: str, steps: int) -> dict:
    cfg = load_config(ROOT / "configs" / config)
    train, _ = builtin_split()
    windows = torch.from_numpy(byte_windows(train, cfg.data.window_bytes)).long()
    model = BitTransformerLM(config=cfg.model)
    trainer = Trainer(model, cfg.train)
    batch = windows[: cfg.train.batch_size]
    trainer.train_step([batch])  # warm-up
    t = time.perf_counter()
    for i in range(steps):
        trainer.train_step([windows[(i + 1) * cfg.train.batch_size : (i + 2) * cfg.train.batch_size]])
    dt = (time.perf_counter() - t) / steps
    return {
        "config": config,
        "parameters": model.num_parameters(),
        "batch_bits": batch.numel(),
        "seconds_per_step": dt,
        "train_bits_per_s": batch.numel() / dt,
        "train_bytes_per_s": batch.numel() / 9 / dt,
    }


def generation(config: str, prompt_bytes: int, new_bytes: int) -> dict:
    cfg = load_config(ROOT / "configs" / config)
    model_cfg = cfg.model
    model_cfg.max_seq_len = 9 * (prompt_bytes + 64)
    model = BitTransformerLM(config=model_cfg).eval()
    prompt = torch.from_numpy(bytes_to_bits(builtin_corpus().encode()[:prompt_bytes])).long()[None]
    out = {"config": config, "prompt_bytes": prompt_bytes}
    for use_cache, n in ((True, new_bytes), (False, max(2, new_bytes // 16))):
        generate_bits(model, prompt, 1, temperature=1.0, use_cache=use_cache)  # warm-up
        dt = best_of(lambda n=n, c=use_cache: generate_bits(model, prompt, n, temperature=1.0, use_cache=c), 2)
        out["cached_bytes_per_s" if use_cache else "uncached_bytes_per_s"] = n / dt
    out["cache_speedup"] = out["cached_bytes_per_s"] / out["uncached_bytes_per_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="benchmarks/results/core.json")
    ap.add_argument("--config", default="small.yaml")
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    np.random.seed(0)
    torch.set_num_threads(1)
    result = {"threads_codec": 1, "codec": codec()}
    torch.set_num_threads(2)
    result["training"] = training(args.config, args.steps)
    result["generation"] = generation(args.config, prompt_bytes=512, new_bytes=32)
    result["goals"] = {
        "encode_ge_100MBps": result["codec"]["encode_bytes_to_bits_MBps"] >= 100,
        "cache_ge_10x_at_512_byte_prompt": result["generation"]["cache_speedup"] >= 10,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
