"""The main job on embedded defaults: prepare -> train -> evaluate -> sample.

    python pipelines/demo.py [--config configs/small.yaml] [--set key=value ...]

Starts a local Ray cluster (or joins RAY_ADDRESS), prepares the built-in corpus with Ray Data,
trains the small config with Ray Train (2 workers, DDP, a few minutes), records everything in
the local MLflow store (./mlflow.db), evaluates the final checkpoint against gzip/bz2/xz, and
prints a generated sample and the command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bitlm import BitTransformerLM, load_config, sample_text  # noqa: E402
from bitlm.config import dump_config  # noqa: E402
from pipelines import evaluate, train  # noqa: E402
from pipelines.common import init_ray  # noqa: E402
from pipelines.prepare_data import prepare  # noqa: E402
from pipelines.tracking import tracking_uri  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(dump_config(cfg))
    start = time.time()
    init_ray()
    print("== 1/4 prepare: Ray Data encodes the built-in corpus into parquet shards")
    manifest = prepare(cfg.data)
    s = manifest["splits"]
    print(
        f"   {s['train']['windows']} train / {s['val']['windows']} val windows of {cfg.data.window_bytes} bytes, {manifest['rejected_total']} rejected"
    )
    print(f"== 2/4 train: Ray Train, {cfg.run.num_workers} workers, strategy {cfg.run.strategy}")
    out = train.run(cfg)
    print(f"== 3/4 evaluate: {out['checkpoint']}")
    result = evaluate.evaluate_checkpoint(out["checkpoint"], cfg.data.output_dir)
    evaluate.log_to_mlflow(out["run_id"], result)
    print(evaluate.table(result))
    stable = Path("runs/demo/final_checkpoint")  # what serve/config.yaml and `make serve` load
    shutil.rmtree(stable, ignore_errors=True)
    shutil.copytree(out["checkpoint"], stable)
    print("== 4/4 sample")
    model = BitTransformerLM.from_pretrained(stable).eval()
    prompt = "The return statement"
    print(f"   {prompt!r} -> {sample_text(model, prompt, 160, temperature=0.7, seed=0)!r}")
    m = out["metrics"]
    print(
        f"\ntrained {m.get('step')} steps; train loss {m.get('loss', float('nan')):.4f}, K {m.get('K', float('nan')):.3f} C {m.get('C', float('nan')):.3f} S {m.get('S', float('nan')):.3f}"
    )
    print(
        f"validation bits/byte {result['model']['bpb']:.3f} (parity {result['model']['parity_bpb']:.4f}); demo took {time.time() - start:.0f} s"
    )
    print(
        f"MLflow run {out['run_id']}. Look at it with:\n   .venv/bin/mlflow ui --backend-store-uri {tracking_uri()} --port 5000"
    )
    return {"train": out, "evaluation": result}


if __name__ == "__main__":
    main()
