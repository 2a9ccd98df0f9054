"""Corpus files -> documents: what pipelines/prepare_data.py reads.

``discover`` expands the inputs (files, directories, globs) on the driver; ``read_documents``
makes one Ray Dataset of documents ``{source, record, start, raw, reason, detail}`` from them:
a text file is one document, a JSON Lines file one per line, a parquet file one per row
(``data.text_field``), the built-in corpus one per pydoc topic. ``_validate`` marks what cannot
be text (invalid UTF-8, empty, binary) with its reason; nothing is dropped here.
"""

from __future__ import annotations

import glob
import json
import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bitlm.config import DataConfig

JSONL_EXT = {".jsonl", ".ndjson", ".json"}
PARQUET_EXT = {".parquet"}
# Text per Ray Data block (a performance setting: the shards do not depend on it). Each task
# has a fixed cost (~25 ms on a busy 2-core machine): at Ray Data's default of ~1 MiB blocks
# preparation spent most of its time there. A block's windows (4x its text at a stride of a
# quarter window) stay well under Ray Data's 128 MiB block limit.
BLOCK_BYTES = 16 << 20


# -- discovery (driver) --------------------------------------------------------------------------


def discover(inputs: list[str]) -> tuple[list[str], list[dict]]:
    """Expand files, directories and globs; return (readable files, rejects for the rest)."""
    files, rejects = [], []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if any(c in item for c in "*?[") else [item]
        if not matches:
            rejects.append({"reason": "unreadable_file", "source": item, "detail": "no file matches"})
        for path in matches:
            p = Path(path)
            if p.is_dir():
                files.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith("."))
            elif p.is_file() and os.access(p, os.R_OK):
                files.append(str(p))
            else:
                detail = "not found" if not p.exists() else "permission denied"
                rejects.append({"reason": "unreadable_file", "source": str(p), "detail": detail})
    return sorted(set(files)), rejects


# -- documents (Ray Data tasks) ------------------------------------------------------------------


def _reject(source: str, record: int, reason: str, detail: str = "") -> dict:
    return {"source": source, "record": record, "start": 0, "raw": b"", "reason": reason, "detail": detail}


def _doc(source: str, record: int, raw: bytes) -> dict:
    return {"source": source, "record": record, "start": 0, "raw": raw, "reason": "", "detail": ""}


def _text_file_docs(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A text file is one document (a batch of files at a time, validated)."""
    n = len(batch["path"])
    docs = {
        "source": batch["path"].astype(object),
        "record": np.zeros(n, np.int64),
        "start": np.zeros(n, np.int64),
        "raw": batch["bytes"],
        "reason": np.full(n, "", dtype=object),
        "detail": np.full(n, "", dtype=object),
    }
    return _validate(docs)


def _jsonl_docs(row: dict, text_field: str) -> list[dict]:
    """A JSON Lines file is one document per non-empty line."""
    out = []
    lines = bytes(row["bytes"]).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the file is not an empty record
    for i, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            reason = "empty_document" if not line.strip() else "malformed_json"
            out.append(_reject(row["path"], i, reason, str(e)[:120]))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            got = type(obj.get(text_field)).__name__ if isinstance(obj, dict) and text_field in obj else "absent"
            out.append(_reject(row["path"], i, "missing_text_field", f"field {text_field!r}: {got}"))
            continue
        out.append(_doc(row["path"], i, obj[text_field].encode("utf-8", errors="surrogatepass")))
    return out


def _parquet_docs(batch: dict[str, np.ndarray], text_field: str) -> dict[str, list]:
    out: dict[str, list] = defaultdict(list)
    for i, (path, text) in enumerate(zip(batch["path"], batch[text_field])):
        d = _doc(str(path), int(batch["__row"][i]), b"") if isinstance(text, str) else None
        if d is None:
            d = _reject(str(path), int(batch["__row"][i]), "missing_text_field", f"{text_field!r} is null")
        else:
            d["raw"] = text.encode("utf-8", errors="surrogatepass")
        for k, v in d.items():
            out[k].append(v)
    return out


_CONTROL = np.zeros(256, bool)  # the bytes _looks_binary counts: control characters but tab, LF, FF, CR
_CONTROL[:32] = True
_CONTROL[[9, 10, 12, 13]] = False


def _looks_binary(raw: bytes) -> bool:
    """NUL bytes, or mostly bytes that are neither printable ASCII, whitespace nor UTF-8."""
    head = raw[:8192]
    if b"\x00" in head:
        return True
    controls = np.count_nonzero(_CONTROL[np.frombuffer(head, np.uint8)])
    return len(head) > 0 and controls / len(head) > 0.1


def _validate(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mark documents that cannot be trained on with their reason."""
    reasons, details = list(batch["reason"]), list(batch["detail"])
    for i, raw in enumerate(batch["raw"]):
        if reasons[i]:
            continue
        raw = bytes(raw)
        if _looks_binary(raw):
            reasons[i], details[i] = "binary_file", "NUL or control bytes"
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            reasons[i], details[i] = "invalid_utf8", f"byte {e.start}: {e.reason}"
            continue
        if not text or text.isspace():  # nothing but whitespace (as str.strip() sees it)
            reasons[i], details[i] = "empty_document", ""
    batch["reason"], batch["detail"] = np.array(reasons, dtype=object), np.array(details, dtype=object)
    return batch


def _blocks(size: int, count: int) -> int:
    """Blocks for ``count`` files or records of ``size`` bytes in all: one per BLOCK_BYTES."""
    return max(1, min(count, -(-size // BLOCK_BYTES)))


def _size(files: list[str]) -> int:
    return sum(os.path.getsize(f) for f in files)


def read_documents(files: list[str], cfg: DataConfig):
    """One Ray Dataset of validated documents ``{source, record, start, raw, reason, detail}``
    from the inputs (each reader validates its batches in the task that reads them)."""
    import ray.data

    parts = []
    text = [f for f in files if Path(f).suffix.lower() not in JSONL_EXT | PARQUET_EXT]
    jsonl = [f for f in files if Path(f).suffix.lower() in JSONL_EXT]
    parquet = [f for f in files if Path(f).suffix.lower() in PARQUET_EXT]
    if text:
        parts.append(
            ray.data.read_binary_files(
                text, include_paths=True, override_num_blocks=_blocks(_size(text), len(text))
            ).map_batches(_text_file_docs, batch_format="numpy")
        )
    if jsonl:
        parts.append(
            ray.data.read_binary_files(jsonl, include_paths=True, override_num_blocks=_blocks(_size(jsonl), len(jsonl)))
            .flat_map(_jsonl_docs, fn_kwargs={"text_field": cfg.text_field})
            .map_batches(_validate, batch_format="numpy")
        )
    file_rejects = []
    good_parquet = []
    for f in parquet:
        try:
            names = pq.read_schema(f).names
        except (pa.ArrowInvalid, OSError) as e:
            file_rejects.append({"reason": "unreadable_file", "source": f, "detail": str(e)[:120]})
            continue
        if cfg.text_field not in names:
            file_rejects.append(
                {"reason": "missing_text_field", "source": f, "detail": f"no column {cfg.text_field!r} in {names}"}
            )
            continue
        good_parquet.append(f)
    for f in good_parquet:  # one read per file, so a row's number is its index in its file
        table = pq.read_table(f, columns=[cfg.text_field])
        table = table.append_column("path", pa.array([f] * table.num_rows)).append_column(
            "__row", pa.array(range(table.num_rows))
        )
        parts.append(
            ray.data.from_arrow(table)
            .map_batches(_parquet_docs, fn_kwargs={"text_field": cfg.text_field}, batch_format="numpy")
            .map_batches(_validate, batch_format="numpy")
        )
    if not files:
        from pydoc_data.topics import topics

        items = [_doc(f"pydoc_data.topics:{name}", 0, topics[name].encode("utf-8")) for name in sorted(topics)]
        blocks = _blocks(sum(len(d["raw"]) for d in items), len(items))
        parts.append(
            ray.data.from_items(items, override_num_blocks=blocks).map_batches(_validate, batch_format="numpy")
        )
    if not parts:
        return None, file_rejects
    return (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]), file_rejects
