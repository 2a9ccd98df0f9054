"""The main job on embedded defaults: prepare -> train -> evaluate -> sample, in a few minutes.

    python pipelines/demo.py [--config configs/small.yaml] [--set key=value ...] [--verbose]

Starts a local Ray cluster (or joins RAY_ADDRESS), prepares the built-in corpus with Ray Data,
trains the small config with Ray Train (2 workers, DDP), records the run in the local MLflow
store (./mlflow.db) with the model registered, evaluates it against gzip/bz2/xz on the same
held-out bytes, and ends with a table, a generated sample and the commands that open the run.
One progress line per stage; ``--verbose`` shows Ray's own logs as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bitlm import BitTransformerLM, load_config, sample_text  # noqa: E402
from pipelines import evaluate, train  # noqa: E402
from pipelines.common import init_ray  # noqa: E402
from pipelines.prepare_data import prepare  # noqa: E402
from pipelines.tracking import tracking_uri  # noqa: E402

STABLE = Path("runs/demo/final_checkpoint")  # what serve/config.yaml and `make serve` load


def closing_table(result: dict, train_out: dict, seconds: float) -> str:
    m, ev = train_out["metrics"], result["model"]
    rows = [(f"BitTransformerLM (this run, {ev['parameters'] / 1e6:.1f} M parameters)", ev["bpb"])]
    rows += [(name, v["alone"]) for name, v in result["compressors"].items()]
    best = min(v for _, v in rows[1:])
    lines = [
        f"Held-out text: {result['val_bytes']:,} bytes of {result['val_documents']} documents no training step saw",
        "| model | bits/byte |",
        "|---|---|",
        *(f"| {name} | {value:.3f}{' (best)' if value == min(r[1] for r in rows) else ''} |" for name, value in rows),
        f"The model {'beats' if ev['bpb'] < best else 'does not beat'} every compressor ({ev['bpb'] / best:.2f}x the best);"
        f" parity costs it {ev['parity_bpb']:.4f} bits/byte.",
        f"Trained {int(m.get('step', 0))} steps; final K {m.get('K', float('nan')):.2f} C {m.get('C', float('nan')):.2f}"
        f" S {m.get('S', float('nan')):.2f}; the demo took {seconds:.0f} s.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--verbose", action="store_true", help="Ray's own logs and progress bars too")
    ap.add_argument("--out", default="runs/demo/demo.json", help="the closing table's figures as JSON")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    start = time.time()
    if not args.verbose:  # MLflow's INFO lines (creating its tables, ...): the demo says what happened
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    print(
        f"bitlm demo: config {cfg.name} ({cfg.model.arch}, d_model {cfg.model.d_model}, {cfg.model.num_layers} layers)"
    )
    init_ray(quiet=not args.verbose)
    manifest = prepare(cfg.data, quiet=not args.verbose)
    s = manifest["splits"]
    print(
        f"prepare: {s['train']['documents']} + {s['val']['documents']} documents -> "
        f"{s['train']['windows']:,} train / {s['val']['windows']:,} held-out windows of {cfg.data.window_bytes} bytes"
        f" ({manifest['rejected_total']} rejected) in {manifest['seconds']:.0f} s"
    )
    out = train.run(cfg, progress=True, verbose=args.verbose)
    result = evaluate.evaluate_checkpoint(out["checkpoint"], cfg.data.output_dir, progress=True)
    evaluate.log_to_mlflow(out["run_id"], result)
    shutil.rmtree(STABLE, ignore_errors=True)
    shutil.copytree(out["checkpoint"], STABLE)
    model = BitTransformerLM.from_pretrained(STABLE).eval()
    prompt = "The return statement"
    sample = sample_text(model, prompt, 120, temperature=0.7, seed=0)
    print()
    print(closing_table(result, out, time.time() - start))
    print(f"sample: {prompt!r} -> {sample!r}")
    summary = {
        "seconds": round(time.time() - start, 1),
        "config": cfg.name,
        "steps": int(out["metrics"].get("step", 0)),
        "train_seconds": out["metrics"].get("seconds"),
        "held_out": {k: result[k] for k in ("val_bytes", "val_documents", "train_bytes")},
        "model": result["model"],
        "compressors": result["compressors"],
        "telemetry": {k: out["metrics"].get(k) for k in ("K", "C", "S")},
        "sample": sample,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"MLflow run {out['run_id']}, model {out.get('registered') or out.get('model_uri')}. Next:")
    print(f"  .venv/bin/mlflow ui --backend-store-uri {tracking_uri()} --port 5000   # the run, its curves")
    print("  make serve                                   # this model over HTTP, with the playground")
    return {"train": out, "evaluation": result}


if __name__ == "__main__":
    main()
