"""Generation speed at batch 1: byte_patch's whole-byte decoding against the byte-level GPT's.

    python benchmarks/gen_speed.py [--new-bytes 256] [--repeats 15] [--threads 1] [--out benchmarks/results/gen_speed.json]

The demo's size (d128 L4, 4 heads, 512 feed-forward), untrained weights: plain decoding does the
same work whatever the weights say (speculative decoding does not, so it is measured on trained
models, in benchmarks/quality.py). Models: the byte GPT (benchmarks/byte_gpt.py), the same with
byte_patch's n-gram input embeddings, BitTransformerLM(arch="byte_patch") as configs/small.yaml
builds it (four bytes a patch: one global step per four bytes, a local step per byte), and the
same at one byte per patch (``byte_patch_P1``). ``<model>@onednn_gelu`` is the byte GPT or
byte_patch with every GELU as plain ``F.gelu``, oneDNN's kernel at every size, instead of
bitlm.torch_utils.gelu (ATen's own kernel for small CPU tensors): what that routing gains,
reported as ``gelu_routing_gain``. Greedy also times byte_patch_P1 with the
library's default (``draft=None``: one greedy row speculates, which only a patch of one byte can),
on these weights the case where drafts are rejected: what speculating costs when it does not
pay. All decode in ``torch.inference_mode`` (bitlm's iter_generate and the yardstick's
generate alike). Each generates ``--new-bytes`` bytes after a 64-byte prompt through its KV cache, sampled
(temperature 1) and greedy; the runs of all models alternate, ``--repeats`` rounds, so a
disturbance hits them alike; reported: the median and best bytes/s of each, and each byte_patch
model's ratio to each GPT (of medians). Ratios within one run are what to compare.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from byte_gpt import ByteGPT  # noqa: E402

from bitlm import BitTransformerLM, load_config  # noqa: E402
from bitlm.bits import byte_tensor_to_bits  # noqa: E402
from bitlm.generate import generate_bits  # noqa: E402

PROMPT = 64


def models(new_bytes: int) -> dict:
    cfg = load_config(ROOT / "configs" / "small.yaml").model
    cfg.max_seq_len = 9 * (PROMPT + new_bytes + 8)
    size = dict(d_model=cfg.d_model, nhead=cfg.nhead, num_layers=cfg.num_layers, dim_feedforward=cfg.dim_feedforward)
    max_bytes = PROMPT + new_bytes + 8
    return {
        "byte_gpt": ByteGPT(**size, max_bytes=max_bytes).eval(),
        "byte_gpt_ngram": ByteGPT(**size, max_bytes=max_bytes, ngram_sizes=cfg.ngram_sizes).eval(),
        "byte_patch": BitTransformerLM(config=cfg).eval(),
        "byte_patch_P1": BitTransformerLM(config=replace(cfg, patch_bytes=1)).eval(),
    }


@contextlib.contextmanager
def onednn_gelu():
    """Every bitlm GELU as plain F.gelu for the block (the models' modules read the name ``gelu``
    at each call)."""
    import bitlm.byte_patch
    import bitlm.model

    saved = bitlm.model.gelu, bitlm.byte_patch.gelu
    bitlm.model.gelu = bitlm.byte_patch.gelu = F.gelu
    try:
        yield
    finally:
        bitlm.model.gelu, bitlm.byte_patch.gelu = saved


def run(kind: str, model, prompt: torch.Tensor, n: int, temperature: float) -> float:
    if kind.endswith("@onednn_gelu"):
        with onednn_gelu():
            return run(kind.removesuffix("@onednn_gelu"), model, prompt, n, temperature)
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    if kind.startswith("byte_gpt"):
        model.generate(prompt.long(), n, g, temperature)
    else:  # plain decoding, or (byte_patch_P1_default) the library's default: greedy speculates
        draft = None if kind.endswith("_default") else 0
        generate_bits(model, byte_tensor_to_bits(prompt), n, temperature, generator=g, draft=draft)
    return n / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-bytes", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/gen_speed.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ms = models(args.new_bytes)
    ms |= {f"{k}@onednn_gelu": ms[k] for k in ("byte_gpt", "byte_patch")}
    prompt = torch.randint(0, 256, (1, PROMPT), dtype=torch.uint8)
    result: dict = {"setup": vars(args), "bytes_per_s": {}, "byte_patch_vs": {}}
    with torch.inference_mode():
        for mode, temperature in (("sampled", 1.0), ("greedy", 0.0)):
            if mode == "greedy":
                ms = {**ms, "byte_patch_P1_default": ms["byte_patch_P1"]}
            for kind, m in ms.items():  # warm-up
                run(kind, m, prompt, 8, temperature)
            speeds: dict[str, list[float]] = {k: [] for k in ms}
            for _ in range(args.repeats):
                for kind, m in ms.items():
                    speeds[kind].append(run(kind, m, prompt, args.new_bytes, temperature))
            result["bytes_per_s"][mode] = {
                k: {"median": statistics.median(v), "best": max(v), "runs": v} for k, v in speeds.items()
            }
            med = {k: statistics.median(v) for k, v in speeds.items()}
            result["byte_patch_vs"][mode] = {
                f"{bp}_vs_{k}": med[bp] / med[k]
                for bp in ("byte_patch", "byte_patch_P1")
                for k in ms
                if k.startswith("byte_gpt") and "@" not in k
            }
            result.setdefault("gelu_routing_gain", {})[mode] = {
                k: med[k] / med[f"{k}@onednn_gelu"] for k in ("byte_gpt", "byte_patch")
            }
            if "byte_patch_P1_default" in med:  # the default's cost where drafts are rejected
                result["byte_patch_vs"][mode]["byte_patch_P1_default_over_plain"] = (
                    med["byte_patch_P1_default"] / med["byte_patch_P1"]
                )
            print(mode, {k: round(v) for k, v in med.items()}, result["byte_patch_vs"][mode], flush=True)
            print(mode, "gelu routing gain", result["gelu_routing_gain"][mode], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
