"""The safety gate at the user guide's defaults (c_floor 0.3, s_floor 0.5) on real and degenerate
text, the K/C/S medians per kind, and one model trained in both modes.

    python benchmarks/gate.py [--seconds 170] [--n 100] [--out benchmarks/results/gate.json]

For each corpus (benchmarks/corpora.py: the built-in pydoc topics, and Vim's help files from
another domain) the demo's model is trained as the demo trains it (configs/small.yaml: its
windows, stride and ``train.max_seconds`` unless ``--seconds`` says otherwise), with ``train_loop``
on the corpus's training bytes; the gate then judges, per kind, ``--n`` texts of
``--bytes`` bytes after a 32-byte prompt of held-out text, exactly as it judges a generation
(bitlm.gated.gate_text: the model reads the text, every byte gets the running K/C/S, the
gate decides; as a whole answer, and as a stream byte by byte): held-out text; the model's own samples at
temperature 0.8; random bytes; one byte repeated; a short phrase (4-16 bytes of held-out text)
looped; random letters and spaces.

Dual mode, on the built-in corpus: the same config trained for the same time causally only,
and with ``train.diffusion`` (denoising mixed in at each ``--diffusion-prob``), ``--seeds``
training seeds each (one run's bits/byte varies by a few hundredths with its seed); held-out
bits/byte of each, their mean; and for each dual model (its first seed), how often a diffusion
retry (one denoising attempt) turns a blocked generation into a passed one, on samples at
temperature 0.8 and 1.6.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from corpora import CORPORA  # noqa: E402

from bitlm import BitTransformerLM, byte_windows, evaluate, load_config, train_loop  # noqa: E402
from bitlm.gated import GateSettings, gate_text, stream_bytes, verdict  # noqa: E402

PROMPT = 32
GATE = GateSettings()  # the guide's floors: c_floor 0.3, s_floor 0.5
OPEN = GATE.open()  # never cuts a text short: the whole text's telemetry
# The guide's interpretation bands: what each kind's median should say.
BANDS = {
    "held-out text": {"C": (0.3, 1.0), "S": (0.5, 1.0)},
    "model samples (T=0.8)": {"C": (0.3, 1.0), "S": (0.5, 1.0)},
    "random bytes": {"K": (0.0, 0.1), "C": (0.8, 1.0), "S": (0.0, 0.3)},
    "one byte repeated": {"K": (0.9, 1.0), "C": (0.0, 0.3)},
    "short phrase looped": {"K": (0.9, 1.0), "C": (0.0, 0.3)},
    "random letters and spaces": {"S": (0.0, 0.3)},
}


def train(
    train_bytes: bytes, val_bytes: bytes, seconds: float | None, seed: int = 0, **overrides
) -> tuple[BitTransformerLM, dict]:
    cfg = load_config(ROOT / "configs" / "small.yaml")
    t = cfg.train
    torch.manual_seed(seed)
    model = BitTransformerLM(config=cfg.model)
    W = cfg.data.window_bytes
    windows = torch.from_numpy(byte_windows(train_bytes, W, cfg.data.stride_bytes))
    val = torch.from_numpy(byte_windows(val_bytes, W)).long()
    settings = dict(lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, lr_schedule=t.lr_schedule)
    settings.update(weight_decay=t.weight_decay, max_seconds=seconds or t.max_seconds, eval_every=0, seed=seed)
    history = train_loop(model, windows, epochs=1000, batch_size=2 * t.batch_size, **{**settings, **overrides})
    scores = evaluate(model, val, batch_size=32, max_batches=40)
    return model.eval(), {"steps": len(history), "val_bpb": scores["val_bpb"], "seed": seed, "settings": overrides}


def texts(val: bytes, n: int, length: int, rng: np.random.Generator) -> dict[str, list[tuple[bytes, bytes]]]:
    """(prompt, text) pairs of every constructed kind; the prompts are held-out text."""
    starts = rng.integers(0, len(val) - PROMPT - length, n)
    prompts = [val[s : s + PROMPT] for s in starts]
    rnd = random.Random(0)
    printable = [ord(c) for c in string.ascii_letters + string.digits + string.punctuation + " "]
    out = {"held-out text": [(p, val[s + PROMPT : s + PROMPT + length]) for p, s in zip(prompts, starts)]}
    out["random bytes"] = [(p, bytes(rng.integers(0, 256, length).astype(np.uint8))) for p in prompts]
    out["one byte repeated"] = [(p, bytes([rnd.choice(printable)]) * length) for p in prompts]
    phrases = [val[s : s + rnd.randint(4, 16)] for s in rng.integers(0, len(val) - 16, n)]
    out["short phrase looped"] = [(p, (ph * (length // len(ph) + 1))[:length]) for p, ph in zip(prompts, phrases)]
    letters = string.ascii_lowercase + " "
    out["random letters and spaces"] = [
        (p, "".join(rnd.choice(letters) for _ in range(length)).encode()) for p in prompts
    ]
    return out


def judge(model, prompt: bytes, text: bytes) -> dict:
    """The gate's verdict on ``text`` as a whole answer (how complete() and Serve's
    non-streamed completions judge), as a stream (byte by byte), and the text's K, C, S."""
    events = gate_text(model, prompt, text, OPEN)
    failed = verdict(events, GATE)
    streamed = gate_text(model, prompt, text, GATE)[-1]
    last = events[-1]
    return {
        "passed": not failed,
        "failed": failed,
        "stream_passed": not streamed.blocked,
        "K": last.K,
        "C": last.C,
        "S": last.S,
    }


def sample(model, prompt: bytes, length: int, temperature: float, seed: int) -> bytes:
    return bytes(e.byte for e in stream_bytes(model, prompt, length, temperature, 1.0, seed, OPEN))


def summarize(rows: list[dict]) -> dict:
    out = {"n": len(rows), "pass_rate": float(np.mean([r["passed"] for r in rows]))}
    out["stream_pass_rate"] = float(np.mean([r["stream_passed"] for r in rows]))
    for m in "KCS":
        out[f"{m}_median"] = float(np.median([r[m] for r in rows]))
    out["blocked_by"] = {m: int(sum(m in r["failed"] for r in rows)) for m in "CS"}
    return out


def gate_table(model, val: bytes, n: int, length: int) -> dict:
    rng = np.random.default_rng(0)
    result = {}
    for kind, pairs in texts(val, n, length, rng).items():
        result[kind] = summarize([judge(model, p, t) for p, t in pairs])
        print(f"  {kind}: {result[kind]}", flush=True)
    prompts = [p for p, _ in texts(val, n, length, np.random.default_rng(1))["held-out text"]]
    t0 = time.time()
    drawn = [sample(model, p, length, 0.8, seed) for seed, p in enumerate(prompts)]
    rows = [judge(model, p, s) for p, s in zip(prompts, drawn)]
    blocked = [
        (p + b" >>> " + s).decode("utf-8", "replace") for p, s, r in zip(prompts, drawn, rows) if not r["passed"]
    ]
    result["model samples (T=0.8)"] = {**summarize(rows), "seconds": time.time() - t0, "blocked_examples": blocked[:10]}
    print(f"  samples: {result['model samples (T=0.8)']}", flush=True)
    for kind, bands in BANDS.items():
        result[kind]["in_guide_band"] = {m: lo <= result[kind][f"{m}_median"] <= hi for m, (lo, hi) in bands.items()}
    return result


def rescue(model, val: bytes, n: int, length: int) -> dict:
    """Blocked first attempts of the dual model, and how many one diffusion retry passes."""
    out = {}
    prompts = [p for p, _ in texts(val, n, length, np.random.default_rng(2))["held-out text"]]
    for temperature in (0.8, 1.6):
        blocked = passed = 0
        for seed, p in enumerate(prompts):
            if judge(model, p, sample(model, p, length, temperature, seed))["passed"]:
                continue
            blocked += 1
            retry = list(stream_bytes(model, p, length, 1.0, 1.0, seed + 1, OPEN, "diffusion"))
            passed += bool(retry) and not verdict(retry, GATE)
        out[f"T={temperature}"] = {"samples": n, "blocked": blocked, "rescued_by_diffusion": passed}
        out[f"T={temperature}"]["rescue_rate"] = passed / blocked if blocked else None
        print(f"  rescue T={temperature}: {out[f'T={temperature}']}", flush=True)
    return out


def markdown(result: dict) -> str:
    lines = []
    for corpus, r in result["corpora"].items():
        lines += [
            f"**{corpus}** ({r['source']}; model: {r['model']['steps']} steps, val {r['model']['val_bpb']:.3f} bits/byte)",
            "",
        ]
        lines += [
            "| kind | passes (whole answer) | blocked by C / S | passes (streamed) | K | C | S |",
            "|---|---|---|---|---|---|---|",
        ]
        for kind, s in r["gate"].items():
            lines.append(
                f"| {kind} | {s['pass_rate']:.0%} | {s['blocked_by']['C']} / {s['blocked_by']['S']} | "
                f"{s['stream_pass_rate']:.0%} | {s['K_median']:.2f} | {s['C_median']:.2f} | {s['S_median']:.2f} |"
            )
        lines.append("")
    d = result["dual_mode"]
    base = d["models"]["causal only"]["mean_val_bpb"]
    lines += ["| pydoc, same time | val bits/byte (mean of seeds) | per seed | vs causal only |", "|---|---|---|---|"]
    for name, m in d["models"].items():
        seeds = " / ".join(f"{r['val_bpb']:.3f}" for r in m["runs"])
        lines.append(f"| {name} | {m['mean_val_bpb']:.3f} | {seeds} | {m['mean_val_bpb'] - base:+.3f} |")
    for name, r in d["rescue"].items():
        for t, v in r.items():
            lines.append(
                f"\n{name}, samples at {t}: {v['blocked']} of {v['samples']} blocked, {v['rescued_by_diffusion']} passed after one diffusion retry"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, help="training time of each model (default: the demo's, 170 s)")
    ap.add_argument("--n", type=int, default=100, help="texts per kind")
    ap.add_argument("--bytes", type=int, default=240, help="bytes per text (a denoising pass fits 255)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2, help="training seeds of each model in the dual-mode comparison")
    ap.add_argument("--diffusion-prob", type=float, nargs="+", default=[0.1, 0.25], help="dual-mode mixes to compare")
    ap.add_argument("--out", default="benchmarks/results/gate.json")
    args = ap.parse_args()
    if args.seeds < 1:
        ap.error("--seeds must be >= 1")
    torch.set_num_threads(args.threads)
    result: dict = {"setup": vars(args), "gate": GateSettings().__dict__, "corpora": {}}
    models = {}
    for name, load in CORPORA.items():
        train_bytes, val, source = load()
        print(f"== {name}: {source}", flush=True)
        model, info = train(train_bytes, val, args.seconds)
        models[name] = (model, val)
        result["corpora"][name] = {"source": source, "model": info, "gate": gate_table(model, val, args.n, args.bytes)}
    train_bytes, val, _ = CORPORA["pydoc"]()
    dual = {"causal only": {"runs": [result["corpora"]["pydoc"]["model"]]}}
    dual["causal only"]["runs"] += [train(train_bytes, val, args.seconds, seed)[1] for seed in range(1, args.seeds)]
    rescue_rates = {}
    for p in args.diffusion_prob:
        name = f"dual mode (diffusion_prob {p})"
        print(f"== {name}", flush=True)
        dual[name] = {"runs": []}
        for seed in range(args.seeds):
            model, info = train(train_bytes, val, args.seconds, seed, diffusion=True, diffusion_prob=p)
            dual[name]["runs"].append(info)
            if seed == 0:
                rescue_rates[name] = rescue(model, val, args.n, args.bytes)
    for m in dual.values():
        m["mean_val_bpb"] = float(np.mean([r["val_bpb"] for r in m["runs"]]))
    result["dual_mode"] = {"models": dual, "rescue": rescue_rates}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(result) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
