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
The training shards hold their windows shuffled: sorted by a hash of each window's document,
offset and ``data.seed`` (``shuffle_keys``), the same order whatever the cluster or Ray's
blocks; the validation shards hold theirs in document order.

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
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bitlm.config import DataConfig, dump_config, load_config, to_dict  # noqa: E402
from bitlm.digest import file_sha256  # noqa: E402
from pipelines.common import FORMAT_VERSION, MANIFEST, DataError, init_ray  # noqa: E402
from pipelines.sources import discover, read_documents  # noqa: E402

EXAMPLES_PER_REASON = 5
# Training windows sorted at a time on the driver (one range of the shuffle's key space): a
# pass over the documents per range, so larger means fewer passes and more memory.
TRAIN_BUCKET_BYTES = 64 << 20


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


def _pieces(batch: dict[str, np.ndarray], chunk: int, seed: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Documents -> one row per piece (valid documents longer than ``chunk`` bytes are cut,
    ``start`` is a piece's offset), with its size ``n`` and its ``split``."""
    index, starts, raws = [], [], []
    for i, (raw, reason) in enumerate(zip(batch["raw"], batch["reason"])):
        raw = bytes(raw)
        cuts = [0] if reason else cut_points(raw, chunk)
        for a, b in zip(cuts, [*cuts[1:], len(raw)]):
            index.append(i)
            starts.append(a)
            raws.append(raw[a:b] if len(cuts) > 1 else raw)
    take = np.array(index, np.int64)
    out = {k: batch[k][take] for k in batch if k not in ("start", "raw")}
    out["start"] = np.array(starts, np.int64)
    out["raw"] = np.empty(len(raws), dtype=object)  # 1-D, bytes as elements (np.array would widen them)
    out["raw"][:] = raws
    out["n"] = np.array([len(r) for r in raws], np.int64)
    out["split"] = np.array([split_of(r, seed, val_fraction) for r in raws], dtype=object)
    return out


def doc_id(source: str, record: int, start: int = 0) -> int:
    """A stable 63-bit id of a document (a piece of a record from its byte ``start``)."""
    key = f"{source}#{record}" + (f"@{start}" if start else "")
    h = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") >> 1


def split_of(raw: bytes, seed: int, val_fraction: float) -> str:
    """train or val for a document, from a hash of its content and the seed."""
    h = hashlib.blake2b(raw, digest_size=8, key=str(seed).encode()).digest()
    return "val" if int.from_bytes(h, "big") / 2**64 < val_fraction else "train"


def shuffle_keys(doc_ids: np.ndarray, offsets: np.ndarray, seed: int) -> np.ndarray:
    """The training order's sort key of each window: a 64-bit hash (splitmix64) of its
    document, offset and ``data.seed``. Sorting by it is a uniform random permutation that
    depends on nothing but the windows themselves (not on Ray's blocks or the cluster)."""

    def mix(z: np.ndarray) -> np.ndarray:
        z = z + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    with np.errstate(over="ignore"):  # the multiplications wrap, as the hash means them to
        first = mix(doc_ids.astype(np.uint64) ^ mix(np.array([seed % 2**64], np.uint64)))
        return mix(first ^ offsets.astype(np.uint64))


def _bucket(keys: np.ndarray, buckets: int) -> np.ndarray:
    """Which of ``buckets`` equal ranges of the key space each key lies in (top 32 bits)."""
    return ((keys >> np.uint64(32)) * np.uint64(buckets)) >> np.uint64(32)


def _windows(
    batch: pa.Table, window: int, stride: int, split: str | None = None, bucket: tuple[int, int, int] | None = None
) -> pa.Table:
    """The windows of a block of documents (``source, record, start, raw``; with ``split``
    only that split's valid documents) as rows ``bytes`` (fixed-size binary), ``doc_id``,
    ``offset``. With ``bucket`` = (seed, index, buckets) only the windows whose shuffle key
    (shuffle_keys) lies in that bucket, with the key as a column ``key``.

    Vectorized over the block: each window's first byte is arithmetic on the documents'
    offsets in the block's text buffer, and the windows are gathered from one strided view of
    it. Fixed-size binary, not a tensor column: Arrow moves and gathers it in C++."""
    keep = np.ones(batch.num_rows, bool)
    if split is not None:
        keep &= batch.column("split").to_numpy(zero_copy_only=False) == split
    if "reason" in batch.column_names:
        keep &= batch.column("reason").to_numpy(zero_copy_only=False) == ""
    table = batch if keep.all() else batch.filter(pa.array(keep))
    raw = table.column("raw").combine_chunks().cast(pa.large_binary())  # one buffer, 64-bit offsets
    ends = np.frombuffer(raw.buffers()[1], np.int64)[raw.offset : raw.offset + len(raw) + 1]
    first, size = ends[:-1], np.diff(ends)
    counts = np.where(size >= window, (size - window) // stride + 1, 0)  # windows per document
    total = int(counts.sum())
    docs = np.repeat(np.arange(len(counts)), counts)  # each window's document
    offset = (np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)) * stride
    keys = zip(*(table.column(k).to_pylist() for k in ("source", "record", "start")), counts)
    ids = np.array([doc_id(s, r, a) if c else 0 for s, r, a, c in keys], np.int64)[docs]
    columns = {}
    if bucket is not None:
        seed, index, buckets = bucket
        key = shuffle_keys(ids, offset, seed)
        mine = _bucket(key, buckets) == index
        docs, offset, ids, columns["key"] = docs[mine], offset[mine], ids[mine], key[mine]
    rows = np.zeros((0, window), np.uint8)
    if len(docs):
        text = np.frombuffer(raw.buffers()[2], np.uint8)
        rows = np.lib.stride_tricks.sliding_window_view(text, window)[first[docs] + offset]  # (rows, window)
    column = pa.FixedSizeBinaryArray.from_buffers(pa.binary(window), len(rows), [None, pa.py_buffer(rows)])
    return pa.table({"bytes": column, "doc_id": ids, "offset": offset.astype(np.int64), **columns})


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


def _write_shard(table: pa.Table, path: Path) -> str:
    """Encode one shard in memory, write it once; its SHA-256."""
    columns = {k: table.column(k).combine_chunks() for k in ("bytes", "doc_id", "offset")}
    columns["bytes"] = columns["bytes"].cast(pa.binary())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    encoded = sink.getvalue()
    path.write_bytes(encoded)
    return hashlib.sha256(encoded).hexdigest()


def write_shards(tables, out_dir: Path, split: str, rows_per_shard: int) -> list[dict]:
    """Write the rows of ``tables`` (pyarrow tables of fixed-size binary ``bytes``, ``doc_id``,
    ``offset``), in order, as parquet shards ``{split}-00000.parquet`` ... of
    ``rows_per_shard`` rows (the last fewer); return their manifest entries (file, rows,
    sha256). Shards are encoded and written by two threads (pyarrow and hashlib let go of the
    GIL) while this one takes the next rows, so a pass of Ray tasks runs beside the writing."""
    from concurrent.futures import ThreadPoolExecutor

    shards: list[dict] = []
    futures = []
    with ThreadPoolExecutor(max_workers=2) as pool:

        def submit(table: pa.Table) -> None:
            name = f"{split}-{len(shards):05d}.parquet"
            shards.append({"file": name, "split": split, "rows": table.num_rows})
            futures.append(pool.submit(_write_shard, table, out_dir / name))
            if len(futures) > 8:  # a bounded backlog: memory stays a few shards
                futures[-9].result()

        pending: list[pa.Table] = []
        held = 0
        for table in tables:
            pending.append(table)
            held += table.num_rows
            while held >= rows_per_shard:
                rows = pa.concat_tables(pending)
                submit(rows.slice(0, rows_per_shard))
                pending, held = [rows.slice(rows_per_shard)], held - rows_per_shard
        if held:
            submit(pa.concat_tables(pending))
    for shard, future in zip(shards, futures):
        shard["sha256"] = future.result()
    return shards


def _shuffled(docs, cfg: DataConfig, stride: int, windows: int):
    """The training windows in their shuffled order (sorted by shuffle_keys), as tables: the
    key space is cut into ranges of about TRAIN_BUCKET_BYTES of windows, and each range is
    one pass over the documents that keeps the windows whose key lies in it and sorts them.
    Memory: one range on the driver, whatever the corpus's size. Time: every pass hashes every
    window, so passes x windows grows with the square of the corpus (at 81 MB, 5 passes)."""
    buckets = max(1, -(-windows * cfg.window_bytes // TRAIN_BUCKET_BYTES))
    for index in range(buckets):
        kwargs = {"window": cfg.window_bytes, "stride": stride, "split": "train", "bucket": (cfg.seed, index, buckets)}
        part = docs.map_batches(_windows, batch_format="pyarrow", fn_kwargs=kwargs)
        if tables := list(part.iter_batches(batch_size=None, batch_format="pyarrow")):
            table = pa.concat_tables(tables)
            del tables  # the range's unsorted copies go before the next pass; the sorted one is written
            table = table.take(np.lexsort([table.column(k).to_numpy() for k in ("offset", "doc_id", "key")]))
            yield table
            del table


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
        docs = docs.map_batches(
            _pieces,
            batch_format="numpy",
            fn_kwargs={"chunk": cfg.chunk_bytes, "seed": cfg.seed, "val_fraction": cfg.val_fraction},
        ).materialize()
        rows = docs.select_columns(["source", "record", "start", "reason", "detail", "n", "split"]).take_all()
        # In input order (file, record, piece), whatever order Ray's blocks arrived in.
        for row in sorted(rows, key=lambda r: (r["source"], r["record"], r["start"])):
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
    # Each split's windows are cut from the documents by the passes that write them: no dataset
    # of windows is held, nor shuffled through the object store.
    for d in usable:
        d["doc_id"] = doc_id(d["source"], d["record"], d["start"])
        d["windows"] = max(0, (d["bytes"] - cfg.window_bytes) // stride + 1)
    train_windows = sum(d["windows"] for d in usable if d["split"] == "train")
    shuffled = _shuffled(docs, cfg, stride, train_windows)
    manifest_shards = write_shards(shuffled, out_dir, "train", cfg.shard_rows)
    val = docs.map_batches(
        _windows, batch_format="pyarrow", fn_kwargs={"window": cfg.window_bytes, "stride": stride, "split": "val"}
    )
    manifest_shards += write_shards(
        val.iter_batches(batch_size=None, batch_format="pyarrow"), out_dir, "val", cfg.shard_rows
    )
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "val"):
        ds = [d for d in usable if d["split"] == split]
        counts[split] = {
            "documents": len(ds),
            "bytes": sum(d["bytes"] for d in ds),
            "windows": sum(s["rows"] for s in manifest_shards if s["split"] == split),
        }
    if empty := [split for split in ("val", "train") if counts[split]["windows"] == 0][:1]:
        raise DataError(
            f"the {empty[0]} split is empty: {counts}; use more documents or change data.val_fraction / data.seed"
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
    ap.add_argument("--input", action="append", help="file, directory or glob (repeatable; default: data.inputs)")
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
