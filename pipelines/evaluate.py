"""Bits per byte of a checkpoint on the validation shards, beside gzip, bz2 and xz.

    python pipelines/evaluate.py --checkpoint runs/ray/<run>/final_checkpoint [--data data/prepared]
    python pipelines/evaluate.py --run-id <mlflow run id>

The model's bits/byte counts the 8 data bits of every byte it predicts (the first bit of each
window has no context and is not predicted); the parity bit's cost is reported apart. The
compressors see the same bytes: the validation windows' text, in document order. Each is
reported alone and conditional on the training text (size of compress(train + val) minus
size of compress(train)), the fair comparison for a model that was trained on that text.
Results are printed as a table and logged to the checkpoint's MLflow run (metrics
``eval_*`` and ``baseline_*``, and ``evaluation.json``).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import json
import lzma
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bitlm import BitTransformerLM, evaluate  # noqa: E402
from bitlm.bits import bits_to_bytes  # noqa: E402
from bitlm.checkpoint import read_config  # noqa: E402
from pipelines.common import read_manifest, shard_paths, unpack_bits  # noqa: E402
from pipelines.tracking import mlflow_client, resolve_checkpoint, tracking_uri  # noqa: E402

COMPRESSORS = {
    "gzip-9": lambda b: gzip.compress(b, 9, mtime=0),
    "bz2-9": lambda b: bz2.compress(b, 9),
    "xz-9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def load_windows(data_dir: str | Path, split: str) -> tuple[torch.Tensor, bytes]:
    """All windows of a split as bits (N, 9W) in document order, and their bytes joined."""
    manifest = read_manifest(data_dir)
    table = (
        pq.ParquetDataset(shard_paths(data_dir, split))
        .read()
        .sort_by([("doc_id", "ascending"), ("offset", "ascending")])
    )
    bits = unpack_bits(table.column("bits").to_pylist(), manifest["bits_per_window"])
    return torch.from_numpy(bits).long(), bits_to_bytes(bits.reshape(-1))


def compressor_bpb(val: bytes, train: bytes) -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in COMPRESSORS.items():
        alone = len(fn(val))
        conditional = len(fn(train + val)) - len(fn(train))
        out[name] = {"alone": 8 * alone / len(val), "conditional": 8 * conditional / len(val)}
    return out


def evaluate_checkpoint(
    checkpoint: str | Path, data_dir: str | Path, batch_size: int = 32, progress: bool = False
) -> dict[str, Any]:
    model = BitTransformerLM.from_pretrained(checkpoint).eval()
    val_bits, val_bytes = load_windows(data_dir, "val")
    _, train_bytes = load_windows(data_dir, "train")
    if progress:  # one line: the model over the held-out windows, batch by batch
        from pipelines.progress import bar

        with bar(len(val_bits), "evaluate", "window") as b:
            parts = []
            for i in range(0, len(val_bits), batch_size):
                chunk = val_bits[i : i + batch_size]
                parts.append((len(chunk), evaluate(model, chunk, batch_size=batch_size)))
                b.update(len(chunk))
        total = sum(n for n, _ in parts)
        scores = {k: sum(n * p[k] for n, p in parts) / total for k in parts[0][1]}
    else:
        scores = evaluate(model, val_bits, batch_size=batch_size)
    return {
        "checkpoint": str(checkpoint),
        "val_windows": len(val_bits),
        "val_bytes": len(val_bytes),
        "train_bytes": len(train_bytes),
        "model": {
            "bpb": scores["val_bpb"],
            "parity_bpb": scores["val_parity_bpb"],
            "parameters": model.num_parameters(),
        },
        "compressors": compressor_bpb(val_bytes, train_bytes),
    }


def table(result: dict[str, Any]) -> str:
    lines = [
        f"| model (validation, {result['val_bytes']:,} bytes) | bits/byte | conditional on train |",
        "|---|---|---|",
        f"| BitTransformerLM ({result['model']['parameters']:,} params) | {result['model']['bpb']:.3f} | (trained on it) |",
    ]
    for name, v in result["compressors"].items():
        lines.append(f"| {name} | {v['alone']:.3f} | {v['conditional']:.3f} |")
    lines.append(f"| parity bit (model, reported apart) | {result['model']['parity_bpb']:.4f} | |")
    return "\n".join(lines)


def log_to_mlflow(run_id: str, result: dict[str, Any]) -> None:
    client = mlflow_client()
    metrics = {"eval_val_bpb": result["model"]["bpb"], "eval_parity_bpb": result["model"]["parity_bpb"]}
    for name, v in result["compressors"].items():
        key = name.replace("-", "")
        metrics[f"baseline_{key}_bpb"] = v["alone"]
        metrics[f"baseline_{key}_conditional_bpb"] = v["conditional"]
    for k, v in metrics.items():
        client.log_metric(run_id, k, v)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "evaluation.json").write_text(json.dumps(result, indent=2))
        Path(d, "evaluation.md").write_text(table(result) + "\n")
        client.log_artifact(run_id, str(Path(d, "evaluation.json")), "evaluation")
        client.log_artifact(run_id, str(Path(d, "evaluation.md")), "evaluation")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint directory (config.json + model.safetensors)")
    src.add_argument("--run-id", help="MLflow run whose 'checkpoint' artifact to evaluate")
    src.add_argument("--model-uri", help="a registered MLflow model, models:/<name>/<version>")
    ap.add_argument("--data", help="prepared data directory (default: the run's, else data/prepared)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--no-mlflow", action="store_true", help="print only")
    args = ap.parse_args(argv)
    run_id, data_dir, tmp = args.run_id, args.data, None
    if args.run_id:
        client = mlflow_client()
        tmp = tempfile.TemporaryDirectory()
        checkpoint = client.download_artifacts(args.run_id, "checkpoint", tmp.name)
        data_dir = data_dir or client.get_run(args.run_id).data.tags.get("data_dir")
    elif args.model_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri())
        tmp = tempfile.TemporaryDirectory()
        checkpoint = resolve_checkpoint(mlflow.artifacts.download_artifacts(args.model_uri, dst_path=tmp.name))
        run_id = read_config(checkpoint).get("extra", {}).get("mlflow_run_id")
        if run_id and not data_dir:
            data_dir = mlflow_client().get_run(run_id).data.tags.get("data_dir")
    else:
        checkpoint = args.checkpoint
        run_id = read_config(checkpoint).get("extra", {}).get("mlflow_run_id")
    result = evaluate_checkpoint(checkpoint, data_dir or "data/prepared", args.batch_size)
    print(table(result))
    if run_id and not args.no_mlflow:
        log_to_mlflow(run_id, result)
        print(f"logged to MLflow run {run_id}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
