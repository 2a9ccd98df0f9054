"""pipelines/prepare_data.py on a real Ray cluster with real parquet files."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bitlm.config import DataConfig
from pipelines.common import DataError, window_bytes
from pipelines.prepare_data import check_fresh, cut_points, doc_id, prepare

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
        rows = window_bytes(table.column("bytes"))
        assert rows.shape == (table.num_rows, 32)
        for row, ident, offset in zip(rows, table.column("doc_id").to_pylist(), table.column("offset").to_pylist()):
            assert docs[ident]["split"] == shard["split"]  # a document never straddles the split
            if ident in sources:
                assert row.tobytes() == sources[ident][offset : offset + 32]
                seen += 1
    assert seen > 10


def test_split_is_deterministic_by_seed(ray_session, corpus, tmp_path):
    cfg = DataConfig(window_bytes=32, val_fraction=0.3, seed=3)
    a = prepare(cfg, [str(corpus)], str(tmp_path / "a"))
    b = prepare(cfg, [str(corpus)], str(tmp_path / "b"))
    assert a["splits"] == b["splits"]
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def test_training_order_is_a_shuffle_that_only_the_windows_and_seed_decide(ray_session, corpus, tmp_path, monkeypatch):
    """The train shards hold their windows shuffled, sorted by a hash of each window and the
    seed: byte for byte the same with a Ray block per file and many passes over the documents
    as with one block and one pass."""
    from pipelines import prepare_data, sources

    cfg = DataConfig(window_bytes=32, stride_bytes=8, val_fraction=0.3, seed=3, shard_rows=50)
    one = prepare(cfg, [str(corpus)], str(tmp_path / "one"))
    monkeypatch.setattr(sources, "BLOCK_BYTES", 512)  # a block per file
    monkeypatch.setattr(prepare_data, "TRAIN_BUCKET_BYTES", 2048)  # several passes over the documents
    many = prepare(cfg, [str(corpus)], str(tmp_path / "many"))
    assert len([s for s in one["shards"] if s["split"] == "train"]) > 2
    assert [s["sha256"] for s in many["shards"]] == [s["sha256"] for s in one["shards"]]
    train = pa.concat_tables(
        pq.read_table(tmp_path / "one" / s["file"]) for s in one["shards"] if s["split"] == "train"
    )
    ids, offsets = train.column("doc_id").to_pylist(), train.column("offset").to_pylist()
    in_document_order = sum(a == b and o < p for a, b, o, p in zip(ids, ids[1:], offsets, offsets[1:]))
    assert in_document_order < 0.5 * len(ids) and len(set(zip(ids, offsets))) == len(ids)


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


def test_cut_points_make_valid_utf8_pieces_near_the_chunk_size():
    """Pieces start after a line break near each mark, else on a UTF-8 character boundary;
    they cover the document exactly, and none but the last is shorter than the chunk."""
    rng = np.random.default_rng(0)
    words = ["bits", "é", "€uro", "日本語", "🙂", "x" * 30]
    for newlines in (True, False):
        text = "".join(
            rng.choice(words) + ("\n" if newlines and rng.random() < 0.05 else " ") for _ in range(20_000)
        ).encode()
        starts = cut_points(text, 4096)
        pieces = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]
        assert b"".join(pieces) == text and len(pieces) > 10
        assert all(4096 <= len(p) < 4096 + 4096 // 8 + 4 for p in pieces[:-1])
        assert 4096 // 4 < len(pieces[-1]) < 2 * 4096
        for p in pieces:
            p.decode("utf-8")  # every piece is whole characters
        if newlines:
            assert sum(p.endswith(b"\n") for p in pieces[:-1]) >= len(pieces) - 3
    assert cut_points(b"short", 4096) == [0]


def test_one_large_file_still_splits_and_no_window_crosses_a_piece(ray_session, tmp_path):
    """A corpus that is one file: its pieces go to train and val apart, every window lies
    inside its piece, and the pieces decode back to the file."""
    lines = [f"line {i}: the bit model reads {i % 97} bytes of text, with é and € now and then.\n" for i in range(4000)]
    corpus = tmp_path / "one.txt"
    corpus.write_text("".join(lines))
    cfg = DataConfig(window_bytes=64, val_fraction=0.25, seed=1, chunk_bytes=8192)
    manifest = prepare(cfg, [str(corpus)], str(tmp_path / "out"))
    s = manifest["splits"]
    assert s["train"]["windows"] > 0 and s["val"]["windows"] > 0
    assert s["train"]["documents"] + s["val"]["documents"] > 20
    docs = sorted(pq.read_table(tmp_path / "out" / "documents.parquet").to_pylist(), key=lambda d: d["start"])
    raw = corpus.read_bytes()
    assert sum(d["bytes"] for d in docs) == len(raw) and docs[0]["start"] == 0
    assert all(a["start"] + a["bytes"] == b["start"] for a, b in zip(docs, docs[1:]))  # contiguous pieces
    by_id = {d["doc_id"]: d for d in docs}
    for shard in manifest["shards"]:
        table = pq.read_table(tmp_path / "out" / shard["file"])
        rows = window_bytes(table.column("bytes"))
        for row, ident, offset in zip(rows, table.column("doc_id").to_pylist(), table.column("offset").to_pylist()):
            d = by_id[ident]
            assert d["split"] == shard["split"] and offset + 64 <= d["bytes"]  # inside its piece
            assert row.tobytes() == raw[d["start"] + offset : d["start"] + offset + 64]


def test_prepared_data_knows_when_it_is_stale(ray_session, corpus, tmp_path):
    """The manifest's fingerprint: the same config and files are fresh (a touched file whose
    content is the same too); a changed setting, a changed, added or removed file is named."""
    import os
    import shutil
    from dataclasses import replace

    src = shutil.copytree(corpus, tmp_path / "corpus")
    cfg = DataConfig(inputs=[str(src)], window_bytes=32, val_fraction=0.3, seed=3)
    manifest = prepare(cfg, None, str(tmp_path / "out"))
    assert check_fresh(manifest, cfg) == []
    good = src / "good.txt"
    os.utime(good, ns=(1, 1))  # touched: its time changes, its content does not
    assert check_fresh(manifest, cfg) == []
    assert check_fresh(manifest, replace(cfg, window_bytes=16)) == [
        "data.window_bytes is 16 in the config but 32 in the prepared data"
    ]
    assert "data.seed" in check_fresh(manifest, replace(cfg, seed=4))[0]
    assert "data.inputs" in check_fresh(manifest, replace(cfg, inputs=[str(src / "nested")]))[0]
    good.write_text(GOOD.replace("fox", "cat"))  # same size, other bytes
    (src / "new.txt").write_text("A new document. " * 10)
    (src / "short.txt").unlink()
    assert check_fresh(manifest, cfg) == [
        f"input {src / 'new.txt'} is new since the data was prepared",
        f"input {src / 'short.txt'} is gone since the data was prepared",
        f"input {good} changed since the data was prepared",
    ]


def test_training_refuses_stale_data_by_name_and_reprepares_when_told(ray_session, tmp_path):
    """pipelines/train.py's ensure_data: shards of other settings stop the run with the
    setting's name (nothing is overwritten); --reprepare prepares them again; shards of an
    older format are prepared again."""
    from bitlm.config import ExperimentConfig, ModelConfig
    from pipelines.common import read_manifest
    from pipelines.train import ensure_data

    out = tmp_path / "prepared"
    cfg = ExperimentConfig(model=ModelConfig(max_seq_len=576), data=DataConfig(window_bytes=64, output_dir=str(out)))
    _, manifest = ensure_data(cfg)  # none there: prepared
    assert manifest["window_bytes"] == 64
    cfg.data.window_bytes = 32
    with pytest.raises(DataError, match="data.window_bytes is 32 in the config but 64 in the prepared data"):
        ensure_data(cfg)
    assert read_manifest(out)["window_bytes"] == 64  # refused, not overwritten
    _, manifest = ensure_data(cfg, reprepare=True)
    assert manifest["window_bytes"] == 32 and check_fresh(read_manifest(out), cfg.data) == []
    path = out / "manifest.json"
    old = json.loads(path.read_text())
    path.write_text(json.dumps({**old, "version": 1}))
    with pytest.raises(DataError, match="format version 1"):
        read_manifest(out)
    _, manifest = ensure_data(cfg)  # an older format is prepared again
    assert manifest["version"] == 2
