"""Bits per byte of a checkpoint on the validation shards, beside gzip, bz2 and xz.

    python pipelines/evaluate.py --checkpoint runs/ray/<run>/final_checkpoint [--data data/prepared]
    python pipelines/evaluate.py --run-id <mlflow run id>

The held-out bytes are the validation windows' text, each document's windows joined back into
its text, in document order: every validation document, or past ``--max-bytes`` (8 MiB by
default) a sample of them of about that size, the same on every call, with as much training
text as the compressors' context; the sample's size and the split's are reported, so memory
and time stay bounded on a corpus of any size. The compressors read all of it; the model reads each document
through a window of its context (``model.max_seq_len``) sliding by half of it, and every byte
is scored once, with at least half a window of the document before it where the document has
it (the first bit of a document has no context and is not scored). Its bits/byte counts the 8
data bits of every byte; the parity bit's cost is reported apart. Each compressor is reported
alone and conditional on the training text (size of compress(train + val) minus size of
compress(train)), the fair comparison for a model that was trained on that text.
Results are printed as a table and logged to the checkpoint's MLflow run (metrics
``eval_*`` and ``baseline_*``, and ``evaluation.json``).
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import json
import lzma
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402

from bitlm import BitTransformerLM  # noqa: E402
from bitlm.bits import byte_tensor_to_bits  # noqa: E402
from bitlm.checkpoint import read_config  # noqa: E402
from bitlm.objectives import nll_sums  # noqa: E402
from pipelines.common import DataError, read_manifest, shard_paths, window_bytes  # noqa: E402
from pipelines.tracking import mlflow_client, resolve_checkpoint, tracking_uri  # noqa: E402

MAX_BYTES = 8 << 20  # held-out bytes read by default (a sample of documents past it)
COMPRESSORS = {
    "gzip-9": lambda b: gzip.compress(b, 9, mtime=0),
    "bz2-9": lambda b: bz2.compress(b, 9),
    "xz-9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def load_window_bytes(data_dir: str | Path, split: str) -> np.ndarray:
    """All windows of a split as bytes (N, W), in document order."""
    return window_bytes(_sorted_table(data_dir, split).column("bytes"))


def _sorted_table(data_dir: str | Path, split: str, documents: set[int] | None = None):
    """A split's windows sorted by (doc_id, offset); with ``documents`` only theirs, read one
    shard at a time (memory: one shard plus what is kept)."""
    paths = shard_paths(data_dir, split)
    if documents is None:
        table = pq.ParquetDataset(paths).read()
    else:
        keep = pa.array(sorted(documents), pa.int64())
        parts = []
        for path in paths:
            t = pq.read_table(path)
            parts.append(t.filter(pc.is_in(t.column("doc_id"), value_set=keep)))
        table = pa.concat_tables(parts)
    return table.sort_by([("doc_id", "ascending"), ("offset", "ascending")])


def sample_documents(data_dir: str | Path, split: str, max_bytes: int | None) -> set[int] | None:
    """Documents of a split up to about ``max_bytes`` of text (None: all), in doc_id order, a
    hash of each document's source: a random sample that is the same on every call. Reads only
    the (doc_id, offset) columns to choose."""
    if not max_bytes:
        return None
    index = pq.ParquetDataset(shard_paths(data_dir, split)).read(columns=["doc_id", "offset"])
    width = read_manifest(data_dir)["window_bytes"]
    ends = index.group_by("doc_id").aggregate([("offset", "max")]).sort_by("doc_id")
    ids, sizes = ends.column("doc_id").to_numpy(), ends.column("offset_max").to_numpy() + width
    n = max(1, int(np.searchsorted(np.cumsum(sizes), max_bytes, side="right")))
    return set(ids[:n].tolist())


def load_texts(data_dir: str | Path, split: str, max_bytes: int | None = None) -> list[bytes]:
    """A split's text as its windows cover it: per document, each run of touching (or
    overlapping) windows joined back into the bytes it covers, in document order; with
    ``max_bytes`` only a sample of its documents of about that many bytes (sample_documents)."""
    table = _sorted_table(data_dir, split, sample_documents(data_dir, split, max_bytes))
    rows = window_bytes(table.column("bytes"))
    width = rows.shape[1] if len(rows) else 0
    texts: list[bytes] = []
    run, end, doc = bytearray(), None, None
    for i, (d, offset) in enumerate(zip(table.column("doc_id").to_pylist(), table.column("offset").to_pylist())):
        window = rows[i].tobytes()
        if d == doc and end is not None and offset <= end:
            run += window[end - offset :]
        else:
            if run:
                texts.append(bytes(run))
            run = bytearray(window)
        doc, end = d, offset + width
    if run:
        texts.append(bytes(run))
    return texts


def sliding_windows(texts: list[bytes], width: int, context: int) -> list[tuple[bytes, int]]:
    """(window bytes, first scored byte) of windows sliding over each text by ``width -
    context`` bytes, so that every byte is scored once, with ``context`` bytes of the text
    before it where the text has them; a text shorter than ``width`` is one short window."""
    step = width - context
    out = []
    for text in texts:
        starts = list(range(0, max(len(text) - width, 0) + 1, step))
        if starts[-1] + width < len(text):
            starts.append(len(text) - width)
        scored_to = 0
        for start in starts:
            window = text[start : start + width]
            out.append((window, scored_to - start if scored_to else 0))
            scored_to = start + len(window)
    return out


def sliding_bpb(model, texts: list[bytes], batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """The model's bits/byte (and parity's) over ``texts`` read through sliding windows."""
    width = model.config.max_seq_len // 9
    windows = sliding_windows(texts, width, width // 2)
    groups: dict[tuple[int, int], list[bytes]] = {}
    for window, first in windows:  # windows batch with their kind: same length, same first scored byte
        groups.setdefault((len(window), first), []).append(window)
    sums = {"data_bits": 0.0, "data_bytes": 0.0, "parity_bits": 0.0, "parity_count": 0}
    device = next(model.parameters()).device
    with contextlib.ExitStack() as stack:
        b = None
        if progress:  # one line: the model over the held-out text, window by window
            from pipelines.progress import bar

            b = stack.enter_context(bar(len(windows), "evaluate", "window"))
        with torch.no_grad():
            for (_, first), group in groups.items():
                for i in range(0, len(group), batch_size):
                    rows = np.frombuffer(b"".join(group[i : i + batch_size]), np.uint8).reshape(-1, len(group[0]))
                    batch = byte_tensor_to_bits(torch.from_numpy(rows.copy()).to(device))
                    logits, _ = model(batch, telemetry=False)
                    for k, v in nll_sums(logits, batch, first).items():
                        sums[k] += v
                    if b is not None:
                        b.update(len(batch))
    return {
        "bpb": sums["data_bits"] / max(sums["data_bytes"], 1e-9),
        "parity_bpb": sums["parity_bits"] / max(sums["parity_count"], 1),
        "windows": len(windows),
        "context_bytes": width // 2,
    }


def compressor_bpb(val: bytes, train: bytes) -> dict[str, dict[str, float]]:
    out = {}
    for name, fn in COMPRESSORS.items():
        alone = len(fn(val))
        conditional = len(fn(train + val)) - len(fn(train))
        out[name] = {"alone": 8 * alone / len(val), "conditional": 8 * conditional / len(val)}
    return out


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_dir: str | Path,
    batch_size: int = 32,
    progress: bool = False,
    max_bytes: int | None = MAX_BYTES,
) -> dict[str, Any]:
    """The checkpoint and the compressors on the same held-out bytes: every validation
    document, or with ``max_bytes`` a sample of them of about that size (and as much training
    text as the compressors' context), so that memory and time stay bounded on any corpus."""
    model = BitTransformerLM.from_pretrained(checkpoint).eval()
    val, train = load_texts(data_dir, "val", max_bytes), load_texts(data_dir, "train", max_bytes)
    if not val:
        raise DataError(f"{data_dir}: the val split has no windows to evaluate on")
    scores = sliding_bpb(model, val, batch_size, progress)
    val_bytes, train_bytes = b"".join(val), b"".join(train)
    splits = read_manifest(data_dir)["splits"]
    return {
        "checkpoint": str(checkpoint),
        "val_documents": len(val),
        "val_bytes": len(val_bytes),
        "train_bytes": len(train_bytes),
        "sample": {
            "max_bytes": max_bytes,
            "val_documents_total": splits["val"]["documents"],
            "val_bytes_total": splits["val"]["bytes"],
            "train_bytes_total": splits["train"]["bytes"],
        },
        "model": {
            "bpb": scores["bpb"],
            "parity_bpb": scores["parity_bpb"],
            "parameters": model.num_parameters(),
            "windows": scores["windows"],
            "context_bytes": scores["context_bytes"],
        },
        "compressors": compressor_bpb(val_bytes, train_bytes),
    }


def table(result: dict[str, Any]) -> str:
    m = result["model"]
    sample = result.get("sample", {})
    held = f"{result['val_bytes']:,} bytes"
    if sample and result["val_bytes"] < sample["val_bytes_total"]:
        held += f" of {sample['val_bytes_total']:,}, {result['train_bytes']:,} bytes of train as context"
    lines = [
        f"| held-out ({held}) | bits/byte | conditional on train |",
        "|---|---|---|",
        f"| BitTransformerLM ({m['parameters']:,} params, {m['context_bytes']}+ bytes of context) | {m['bpb']:.3f} | (trained on it) |",
    ]
    for name, v in result["compressors"].items():
        lines.append(f"| {name} | {v['alone']:.3f} | {v['conditional']:.3f} |")
    lines.append(f"| parity bit (model, reported apart) | {m['parity_bpb']:.4f} | |")
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
    ap.add_argument(
        "--max-bytes",
        type=int,
        default=MAX_BYTES,
        help=f"held-out bytes to read: a sample of the val documents past it, and as much train text for the "
        f"compressors' context (default {MAX_BYTES}; 0: all)",
    )
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
    result = evaluate_checkpoint(checkpoint, data_dir or "data/prepared", args.batch_size, max_bytes=args.max_bytes)
    print(table(result))
    if run_id and not args.no_mlflow:
        log_to_mlflow(run_id, result)
        print(f"logged to MLflow run {run_id}")
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
