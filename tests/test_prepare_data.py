"""pipelines/prepare_data.py on a real Ray cluster with real parquet files."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitlm import bits_to_text
from bitlm.config import DataConfig
from pipelines.common import DataError, unpack_bits
from pipelines.prepare_data import doc_id, prepare

GOOD = "The quick brown fox jumps over the lazy dog. Bits all the way down. " * 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A corpus with good documents and planted bad records of every kind."""
    d = tmp_path_factory.mktemp("corpus")
    (d / "good.txt").write_text(GOOD)
    (d / "nested").mkdir()
    (d / "nested" / "also_good.md").write_text("Markdown counts as text. " * 30)
    (d / "bad_utf8.txt").write_bytes(b"valid start " * 10 + b"\xff\xfe broken" + b" tail" * 10)
    (d / "empty.txt").write_text("   \n\n")
    (d / "binary.dat").write_bytes(bytes(range(256)) * 4)
    (d / "short.txt").write_text("tiny")
    lines = [
        json.dumps({"text": "A JSON Lines record that is long enough to make a window or two. " * 3}),
        "{not json",
        json.dumps({"body": "no text field here"}),
        "",
        json.dumps({"text": "Another good record, also long enough for at least one window of text."}),
    ]
    (d / "records.jsonl").write_text("\n".join(lines) + "\n")
    pq.write_table(
        pa.table({"text": ["Parquet row one is long enough for a window, surely it is.", None]}), d / "rows.parquet"
    )
    pq.write_table(pa.table({"content": ["wrong column"]}), d / "nocol.parquet")
    return d


PLANTED = {
    "invalid_utf8": 1,  # bad_utf8.txt
    "empty_document": 2,  # empty.txt, the empty JSON Lines record
    "binary_file": 1,  # binary.dat
    "malformed_json": 1,
    "missing_text_field": 3,  # a JSON record without "text", a null parquet row, nocol.parquet
    "shorter_than_window": 1,  # short.txt
    "unreadable_file": 1,  # missing.txt
}


@pytest.fixture(scope="module")
def prepared(ray_session, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    cfg = DataConfig(window_bytes=32, stride_bytes=16, val_fraction=0.3, seed=3, shard_rows=20)
    manifest = prepare(cfg, [str(corpus), str(corpus / "missing.txt"), str(corpus / "*.jsonl")], str(out))
    return manifest, out, corpus


def test_manifest_counts_every_planted_bad_record(prepared):
    manifest, _, _ = prepared
    assert {k: v["count"] for k, v in manifest["rejected"].items()} == PLANTED
    assert manifest["rejected_total"] == sum(PLANTED.values())
    assert manifest["rejected"]["unreadable_file"]["examples"][0]["detail"] == "not found"
    assert "byte" in manifest["rejected"]["invalid_utf8"]["examples"][0]["detail"]


def test_manifest_describes_splits_and_shards(prepared):
    manifest, out, _ = prepared
    docs = pq.read_table(out / "documents.parquet").to_pylist()
    assert len(docs) == 5  # good.txt, also_good.md, 2 JSON records, 1 parquet row
    for split in ("train", "val"):
        s = manifest["splits"][split]
        assert s["documents"] == sum(d["split"] == split for d in docs)
        assert s["bytes"] == sum(d["bytes"] for d in docs if d["split"] == split)
        rows = sum(pq.read_metadata(out / sh["file"]).num_rows for sh in manifest["shards"] if sh["split"] == split)
        assert s["windows"] == rows == sum(d["windows"] for d in docs if d["split"] == split) > 0
    import hashlib

    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert manifest["config"]["window_bytes"] == 32 and manifest["bits_per_window"] == 288


def test_shards_decode_back_to_the_source_text(prepared):
    manifest, out, corpus = prepared
    docs = {d["doc_id"]: d for d in pq.read_table(out / "documents.parquet").to_pylist()}
    sources = {
        doc_id(str(corpus / "good.txt"), 0): GOOD.encode(),
        doc_id(str(corpus / "nested" / "also_good.md"), 0): ("Markdown counts as text. " * 30).encode(),
    }
    seen = 0
    for shard in manifest["shards"]:
        table = pq.read_table(out / shard["file"])
        bits = unpack_bits(table.column("bits").to_pylist(), manifest["bits_per_window"])
        for row, ident, offset in zip(bits, table.column("doc_id").to_pylist(), table.column("offset").to_pylist()):
            assert docs[ident]["split"] == shard["split"]  # a document never straddles the split
            text = bits_to_text(row)  # parity checks pass
            if ident in sources:
                assert text.encode() == sources[ident][offset : offset + 32]
                seen += 1
    assert seen > 10


def test_split_is_deterministic_by_seed(ray_session, corpus, tmp_path):
    cfg = DataConfig(window_bytes=32, val_fraction=0.3, seed=3)
    a = prepare(cfg, [str(corpus)], str(tmp_path / "a"))
    b = prepare(cfg, [str(corpus)], str(tmp_path / "b"))
    assert a["splits"] == b["splits"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_split_does_not_depend_on_where_the_corpus_lies(ray_session, corpus, tmp_path):
    import shutil

    cfg = DataConfig(window_bytes=32, val_fraction=0.3, seed=3)
    moved = shutil.copytree(corpus, tmp_path / "elsewhere" / "corpus")
    a = prepare(cfg, [str(corpus)], str(tmp_path / "a"))
    b = prepare(cfg, [str(moved)], str(tmp_path / "b"))
    assert a["splits"] == b["splits"] and a["splits"]["val"]["documents"] > 0  # same documents, by content


def test_nothing_usable_is_a_clear_error(ray_session, corpus, tmp_path):
    with pytest.raises(DataError, match="nothing usable.*binary_file"):
        prepare(DataConfig(window_bytes=32), [str(corpus / "binary.dat"), str(corpus / "empty.txt")], str(tmp_path))


def test_builtin_corpus_is_the_default(ray_session, tmp_path):
    manifest = prepare(DataConfig(window_bytes=64), None, str(tmp_path))
    s = manifest["splits"]
    assert s["train"]["documents"] + s["val"]["documents"] == 79  # pydoc_data.topics
    assert s["train"]["bytes"] + s["val"]["bytes"] > 400_000
    assert manifest["inputs"] == ["builtin:pydoc_data.topics"] and manifest["rejected_total"] == 0
    assert np.isclose(s["val"]["documents"] / 79, 0.1, atol=0.08)


def test_a_changed_shard_or_a_corrupt_manifest_is_refused_by_name(prepared, tmp_path):
    import shutil

    from pipelines.common import read_manifest, shard_paths

    out = tmp_path / "copy"
    shutil.copytree(prepared[1], out)
    assert shard_paths(out, "train")  # intact: every checksum matches
    shard = out / read_manifest(out)["shards"][0]["file"]
    split = read_manifest(out)["shards"][0]["split"]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the parquet file
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {shard} is corrupt"):
        shard_paths(out, split)
    shard.unlink()
    with pytest.raises(DataError, match=f"shard {shard} is missing"):
        shard_paths(out, split)
    manifest = out / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])  # cut short, as a crash mid-write would
    with pytest.raises(DataError, match=f"{manifest} is corrupt"):
        read_manifest(out)
