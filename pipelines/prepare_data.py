"""Prepare a corpus for training with Ray Data: read -> UTF-8 check -> parity encode -> windows
-> parquet shards (train/val) + manifest.json.

    python pipelines/prepare_data.py [--config configs/small.yaml] [--input PATH ...] [--output DIR]

Inputs are files, directories (read recursively) and globs of text (``.txt``, ``.md``, any
other extension), JSON Lines (``.jsonl``/``.ndjson``/``.json``: one document per line, its text in
``data.text_field``) and parquet (``.parquet``: one document per row, text column
``data.text_field``). With no input, the built-in corpus: one document per topic of Python's
``pydoc_data.topics``.

A document longer than ``data.chunk_bytes`` is cut into pieces of about that size, at a line
break where there is one near (else between two UTF-8 characters); each piece is a document
from here on, so a corpus that is one large file still has train and validation text, and no
window crosses a cut. Every document becomes windows of ``data.window_bytes`` bytes, cut every
``data.stride_bytes``. Documents go to train or validation by a hash of their content with
``data.seed``, so the split is deterministic, does not depend on where the corpus lies (the
same files split the same way on every machine), and puts copies of one text in the same split.

Shards are parquet files with one row per window: ``bytes`` (the window's text: bits are made
from it where it is read, on the device that reads it: 9 per byte, 8 data bits + parity),
``doc_id`` and ``offset`` (the window's first byte in its document). ``documents.parquet``
lists every document (id, source, record, start: its first byte in the record, bytes, split,
windows). The manifest records the shards' SHA-256 (verified when they are read) and a
fingerprint of what made them: the data settings and each input file's size and SHA-256.
Training refuses shards whose fingerprint no longer matches its config or its files
(``check_fresh``), naming what changed.

Bad records never stop the run and are never dropped silently: invalid UTF-8, empty
documents, binary files, malformed JSON, a missing text field, unreadable files, and documents
shorter than one window are counted by reason in the manifest, with examples. If nothing
usable remains the run fails with a message listing the reasons.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bitlm.checkpoint import file_sha256  # noqa: E402
from bitlm.config import DataConfig, dump_config, load_config, to_dict  # noqa: E402
from pipelines.common import FORMAT_VERSION, MANIFEST, DataError, init_ray  # noqa: E402
from pipelines.sources import discover, read_documents  # noqa: E402

EXAMPLES_PER_REASON = 5


# -- documents -> pieces -> windows (Ray Data tasks) ------------------------------------------


def cut_points(raw: bytes, chunk: int) -> list[int]:
    """Where a document of ``len(raw)`` bytes is cut into pieces of about ``chunk`` bytes (the
    last up to 1.5x): just after a line break within chunk/8 bytes past each mark, else at the
    first UTF-8 character boundary from it (so each piece is valid UTF-8 when the whole is).
    Returns the pieces' starts."""
    starts, pos = [0], 0
    while len(raw) - pos >= chunk + chunk // 2:
        mark = pos + chunk
        nl = raw.find(b"\n", mark, mark + max(chunk // 8, 1))
        cut = nl + 1 if nl >= 0 else mark
        while cut < len(raw) and 0x80 <= raw[cut] < 0xC0:  # not inside a multi-byte character
            cut += 1
        if cut >= len(raw):
            break
        starts.append(cut)
        pos = cut
    return starts


def _chunk(batch: dict[str, np.ndarray], chunk: int) -> dict[str, np.ndarray]:
    """Valid documents longer than ``chunk`` bytes -> one row per piece (``start`` its offset)."""
    out: dict[str, list] = defaultdict(list)
    keys = list(batch)
    for i in range(len(batch["raw"])):
        row = {k: batch[k][i] for k in keys}
        raw = bytes(row["raw"])
        starts = [0] if row["reason"] else cut_points(raw, chunk)
        for a, b in zip(starts, [*starts[1:], len(raw)]):
            for k in keys:
                out[k].append(row[k])
            out["start"][-1] = a
            out["raw"][-1] = raw[a:b]
    return {
        k: np.array(v, dtype=object if k in ("raw", "source", "reason", "detail") else None) for k, v in out.items()
    }


def doc_id(source: str, record: int, start: int = 0) -> int:
    """A stable 63-bit id of a document (a piece of a record from its byte ``start``)."""
    key = f"{source}#{record}" + (f"@{start}" if start else "")
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def split_of(raw: bytes, seed: int, val_fraction: float) -> str:
    """train or val for a document, from a hash of its content and the seed."""
    h = hashlib.blake2b(raw, digest_size=8, key=str(seed).encode()).digest()
    return "val" if int.from_bytes(h, "big") / 2**64 < val_fraction else "train"


def _windows(batch: dict[str, np.ndarray], window: int, stride: int) -> dict[str, np.ndarray]:
    """Cut each document into windows of bytes (vectorized per document). Columns are plain
    numpy arrays, so blocks move through Arrow without pickling."""
    parts: dict[str, list[np.ndarray]] = {"bytes": [], "doc_id": [], "offset": [], "split": []}
    for source, record, start, raw, split in zip(
        batch["source"], batch["record"], batch["start"], batch["raw"], batch["split"]
    ):
        data = np.frombuffer(bytes(raw), dtype=np.uint8)
        if data.size < window:
            continue
        starts = np.arange(0, data.size - window + 1, stride)
        parts["bytes"].append(data[starts[:, None] + np.arange(window)])  # (n, window)
        parts["doc_id"].append(np.full(len(starts), doc_id(str(source), int(record), int(start)), dtype=np.int64))
        parts["offset"].append(starts.astype(np.int64))
        parts["split"].append(np.full(len(starts), split))
    if not parts["bytes"]:
        return {
            "bytes": np.zeros((0, window), np.uint8),
            "doc_id": np.zeros(0, np.int64),
            "offset": np.zeros(0, np.int64),
            "split": np.zeros(0, "<U5"),
        }
    return {k: np.concatenate(v) for k, v in parts.items()}


# -- the fingerprint: what made the shards ----------------------------------------------------


def data_settings(cfg: DataConfig, inputs: list[str] | None = None) -> dict:
    """The settings that decide the shards' content (not where they lie, nor how they are read)."""
    return {
        "inputs": list(cfg.inputs if inputs is None else inputs),
        "builtin": f"pydoc_data.topics (Python {sys.version_info[0]}.{sys.version_info[1]})",
        "text_field": cfg.text_field,
        "window_bytes": cfg.window_bytes,
        "stride_bytes": cfg.stride_bytes,
        "chunk_bytes": cfg.chunk_bytes,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
    }


def file_fingerprints(files: list[str]) -> list[dict]:
    """Size, modification time and SHA-256 of each input file."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append({"path": f, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": file_sha256(f)})
    return out


def check_fresh(manifest: dict, cfg: DataConfig) -> list[str]:
    """What no longer matches between prepared data and ``cfg`` with its input files: one line
    per setting, added, removed or changed file (empty when the data is fresh). A file whose
    size and modification time are unchanged is not read; one whose time changed is hashed."""
    fp = manifest.get("fingerprint")
    if manifest.get("version") != FORMAT_VERSION or not isinstance(fp, dict):
        return [f"the shards are format version {manifest.get('version')}, this bitlm reads version {FORMAT_VERSION}"]
    stale = []
    now = data_settings(cfg)
    for key, value in now.items():
        was = fp["settings"].get(key)
        if key == "builtin" and now["inputs"]:
            continue
        if was != value:
            name = key if key == "builtin" else f"data.{key}"
            stale.append(f"{name} is {value!r} in the config but {was!r} in the prepared data")
    if any(s.startswith("data.inputs") for s in stale):
        return stale  # other inputs: their files are not comparable
    files, _ = discover(now["inputs"]) if now["inputs"] else ([], [])
    old = {f["path"]: f for f in fp["files"]}
    for f in sorted(set(files) - set(old)):
        stale.append(f"input {f} is new since the data was prepared")
    for f in sorted(set(old) - set(files)):
        stale.append(f"input {f} is gone since the data was prepared")
    for f in sorted(set(files) & set(old)):
        st, was = os.stat(f), old[f]
        if st.st_size != was["bytes"] or (st.st_mtime_ns != was["mtime_ns"] and file_sha256(f) != was["sha256"]):
            stale.append(f"input {f} changed since the data was prepared")
    return stale


# -- the job -------------------------------------------------------------------------------------


def write_shards(ds, out_dir: Path, split: str, rows_per_shard: int) -> list[dict]:
    """Write ``ds`` as parquet shards ``{split}-00000.parquet`` ... with pyarrow; return their
    manifest entries (file, rows, sha256)."""
    shards = []
    for i, batch in enumerate(ds.iter_batches(batch_size=rows_per_shard, batch_format="numpy")):
        data = np.ascontiguousarray(batch["bytes"], dtype=np.uint8)  # (rows, window bytes)
        width = data.shape[1]
        column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(data), [None, pa.py_buffer(data.tobytes())])
        table = pa.table({"bytes": column.cast(pa.binary()), "doc_id": batch["doc_id"], "offset": batch["offset"]})
        name = f"{split}-{i:05d}.parquet"
        pq.write_table(table, out_dir / name)
        digest = file_sha256(out_dir / name)
        shards.append({"file": name, "split": split, "rows": table.num_rows, "sha256": digest})
    return shards


def prepare(
    cfg: DataConfig, inputs: list[str] | None = None, output_dir: str | None = None, quiet: bool = False
) -> dict:
    """Run the whole preparation; return the manifest (also written to the output dir).
    ``quiet`` turns Ray Data's own progress bars and logs off."""
    import ray
    from ray.data import DataContext

    if quiet:
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    start = time.time()
    inputs = list(cfg.inputs if inputs is None else inputs)
    out_dir = Path(output_dir or cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.parquet")) + [out_dir / MANIFEST]:
        old.unlink(missing_ok=True)
    files, rejects = discover(inputs) if inputs else ([], [])
    if inputs and not files and not rejects:
        raise DataError(f"no input files found in {inputs}")
    docs, file_rejects = read_documents(files, cfg) if (files or not inputs) else (None, [])
    rejects += file_rejects
    doc_rows = []
    if docs is not None:
        seed, frac = cfg.seed, cfg.val_fraction
        docs = (
            docs.map_batches(_chunk, batch_format="numpy", fn_kwargs={"chunk": cfg.chunk_bytes})
            .map_batches(
                lambda b: {
                    **b,
                    "n": np.array([len(bytes(r)) for r in b["raw"]], np.int64),
                    "split": np.array([split_of(bytes(r), seed, frac) for r in b["raw"]]),
                },
                batch_format="numpy",
            )
            .materialize()
        )
        for row in docs.select_columns(["source", "record", "start", "reason", "detail", "n", "split"]).take_all():
            if row["reason"]:
                rejects.append({k: row[k] for k in ("reason", "source", "record", "detail")})
            else:
                doc_rows.append(
                    {
                        "source": row["source"],
                        "record": int(row["record"]),
                        "start": int(row["start"]),
                        "bytes": int(row["n"]),
                        "split": row["split"],
                    }
                )
    stride = cfg.stride_bytes or cfg.window_bytes
    short = [d for d in doc_rows if d["bytes"] < cfg.window_bytes]
    for d in short:
        rejects.append(
            {
                "reason": "shorter_than_window",
                "source": d["source"],
                "record": d["record"],
                "detail": f"{d['bytes']} bytes < window {cfg.window_bytes}",
            }
        )
    usable = [d for d in doc_rows if d["bytes"] >= cfg.window_bytes]
    if not usable:
        raise DataError(
            f"nothing usable remains in {inputs or 'the built-in corpus'}: rejected {dict(Counter(r['reason'] for r in rejects))}"
        )
    with warnings.catch_warnings():  # Ray Data's hint to use its expressions: these rows are few, per document
        warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")
        valid = docs.filter(lambda r: not r["reason"])
    windows = valid.map_batches(
        _windows,
        batch_format="numpy",
        fn_kwargs={"window": cfg.window_bytes, "stride": stride},
    ).materialize()
    manifest_shards = []
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Use 'expr' instead of 'fn'")
            part = windows.filter(lambda r, s=split: r["split"] == s)
        if split == "train":
            part = part.random_shuffle(seed=cfg.seed)
        manifest_shards += write_shards(part, out_dir, split, cfg.shard_rows)
    for d in usable:
        d["doc_id"] = doc_id(d["source"], d["record"], d["start"])
        d["windows"] = max(0, (d["bytes"] - cfg.window_bytes) // stride + 1)
    for split in ("train", "val"):
        ds = [d for d in usable if d["split"] == split]
        counts[split] = {
            "documents": len(ds),
            "bytes": sum(d["bytes"] for d in ds),
            "windows": sum(s["rows"] for s in manifest_shards if s["split"] == split),
        }
    if counts["val"]["windows"] == 0 or counts["train"]["windows"] == 0:
        raise DataError(
            f"the {'val' if counts['val']['windows'] == 0 else 'train'} split is empty: {counts}; use more documents or change data.val_fraction / data.seed"
        )
    pq.write_table(pa.Table.from_pylist(usable), out_dir / "documents.parquet")
    by_reason: dict[str, dict] = {}
    for r in rejects:
        entry = by_reason.setdefault(r["reason"], {"count": 0, "examples": []})
        entry["count"] += 1
        if len(entry["examples"]) < EXAMPLES_PER_REASON:
            entry["examples"].append({k: r.get(k) for k in ("source", "record", "detail")})
    manifest = {
        "format": "bitlm-shards",
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": round(time.time() - start, 2),
        "inputs": inputs or ["builtin:pydoc_data.topics"],
        "config": to_dict(cfg),
        "fingerprint": {"settings": data_settings(cfg, inputs), "files": file_fingerprints(files)},
        "window_bytes": cfg.window_bytes,
        "bits_per_window": 9 * cfg.window_bytes,
        "splits": counts,
        "shards": manifest_shards,
        "rejected": by_reason,
        "rejected_total": len(rejects),
        "ray_version": ray.__version__,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="experiment YAML; its data section is used")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--input",
        action="append",
        help="file, directory or glob (repeatable); default: data.inputs or the built-in corpus",
    )
    ap.add_argument("--output", help="output directory (default: data.output_dir)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    print(dump_config(cfg.data))
    init_ray()
    manifest = prepare(cfg.data, args.input, args.output)
    s = manifest["splits"]
    print(
        f"\nprepared {s['train']['documents']} + {s['val']['documents']} documents "
        f"({s['train']['bytes']:,} + {s['val']['bytes']:,} bytes) into {s['train']['windows']} train and "
        f"{s['val']['windows']} val windows, {len(manifest['shards'])} shards, in {manifest['seconds']} s"
    )
    for reason, entry in manifest["rejected"].items():
        print(f"rejected {entry['count']:5d} x {reason}: e.g. {entry['examples'][0]}")
    print(f"manifest: {Path(args.output or cfg.data.output_dir) / MANIFEST}")
    return manifest


if __name__ == "__main__":
    main()
