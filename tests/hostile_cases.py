"""Hostile input, generated: the Hypothesis strategies and the one-case checks that
tests/test_hostile_input.py runs a few hundred times and benchmarks/faults.py (``--only
hostile``) runs ten thousand times. A check returns when the code under test took the case or
refused it by name (its named error, a 4xx with the API's JSON error body); anything else
(another exception, a failed assertion, a 5xx, a broken connection) raises."""

import json
import urllib.error
import urllib.request
from pathlib import Path

from hypothesis import strategies as st

from bitlm import ConfigError, ParityError, bits_to_bytes, bits_to_text, bytes_to_bits, text_to_bits
from bitlm.config import apply_overrides, load_config

BIG = st.one_of(
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, -(2**70), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
)
TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=40)  # lone surrogates included
JSON_LEAF = st.one_of(st.none(), st.booleans(), BIG, TEXT)
JSON = st.recursive(
    JSON_LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4), max_leaves=20
)

BYTES = st.binary(max_size=300)
BITS = st.lists(st.integers(0, 1), max_size=200)

SECTIONS = {"model": ["d_model", "nhead", "num_layers", "dropout", "arch", "patch_bytes", "max_seq_len"],
            "train": ["lr", "batch_size", "max_steps", "diffusion_prob", "grad_clip", "epochs"],
            "data": ["window_bytes", "val_fraction", "shuffle_windows", "inputs"],
            "run": ["num_workers", "strategy", "threads_per_worker"]}  # fmt: skip
CONFIGS = st.dictionaries(
    st.sampled_from(sorted(SECTIONS)),
    st.dictionaries(
        st.sampled_from(sorted({k for v in SECTIONS.values() for k in v}) + ["no_such_key"]), JSON, max_size=3
    ),
    max_size=3,
)
OVERRIDES = st.lists(
    st.tuples(st.sampled_from(["train.lr", "model.d_model", "run.strategy", "data.inputs", "x.y", "train"]),
              st.text(max_size=20)),
    max_size=3,
)  # fmt: skip

FIELDS = st.fixed_dictionaries(
    {"model": st.sampled_from(["bitlm", "other"]) | TEXT},
    optional={"prompt": TEXT | JSON, "max_tokens": BIG | JSON, "temperature": BIG, "top_p": BIG, "seed": BIG,
              "n": BIG, "stream": st.booleans() | JSON, "stop": JSON},
)  # fmt: skip
# Valid in form, hostile in content (any text, edge numbers), so the answering paths (streamed
# or not, stop strings, seeds) are met too; the two above are refused almost always.
NEAR_VALID = st.fixed_dictionaries(
    {"model": st.just("bitlm"), "prompt": TEXT, "max_tokens": st.integers(1, 8)},
    optional={"temperature": st.floats(0, 2), "top_p": st.floats(0, 1, exclude_min=True),
              "seed": st.integers(-(2**63), 2**63 - 1), "stream": st.booleans(),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "stop": TEXT | st.lists(TEXT, max_size=4)},
)  # fmt: skip
BODIES = st.one_of(FIELDS, NEAR_VALID, JSON)

HAND_MADE = [
    b"[" * 5000 + b"]" * 5000,  # deep nesting
    b'{"model": "bitlm", "prompt": "' + b"a" * 20_000_000 + b'"}',  # a 20 MB prompt
    b'{"model": "bitlm", "prompt": "\\udcff"}',  # valid JSON, not encodable as UTF-8
    b'{"model": "bitlm", "prompt": "hi", "seed": 18446744073709551616}',  # 2^64
    b'{"model": "bitlm", "prompt": "hi", "max_tokens": 1e30}',
    b"\xff\xfe not utf-8",
]


def bytes_round_trip(data: bytes) -> None:
    assert bits_to_bytes(bytes_to_bits(data)) == data


def bits_decode(bits: list[int]) -> None:
    """Any bits decode or raise a named error; whole bytes always decode with errors='replace'."""
    try:
        bits_to_text(bits)
    except (ParityError, UnicodeDecodeError, ValueError):
        pass
    assert isinstance(bits_to_text(bits[: len(bits) // 9 * 9], errors="replace"), str)


def text_encode(text: str) -> None:
    """Any Python string encodes and decodes back, or is refused by name (a lone surrogate)."""
    try:
        bits = text_to_bits(text)
    except UnicodeEncodeError:  # a str that UTF-8 cannot hold
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert bits_to_text(bits) == text


def config_loads(sections: dict, directory: Path) -> None:
    path = Path(directory) / "c.yaml"
    path.write_text(json.dumps(sections, allow_nan=True))  # JSON is YAML
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)


def override_applies(pairs: list[tuple[str, str]]) -> None:
    try:
        apply_overrides(load_config(None), [f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        assert str(e)


def post(url: str, raw: bytes, timeout: float = 120) -> int:
    """POST ``raw`` as JSON; the status. An error answer must be the API's JSON error body (a
    crash page, or a broken connection, raises)."""
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        json.loads(e.read())  # an error body the API wrote, not a crash page
        return e.code


def body_answered(url: str, body) -> int:
    """A generated body, as Python's json writes it (NaN and Infinity included): 200 or a 4xx."""
    status = post(url, json.dumps(body, allow_nan=True).encode())
    assert status == 200 or 400 <= status < 500, status
    return status
