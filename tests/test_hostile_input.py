"""Hostile input, generated (Hypothesis): the codec, the config loader and the HTTP API (the
dashboard's server over real HTTP) meet numbers out of machine range, NaN, lone surrogates,
deep nesting and big bodies. Each refuses what it cannot take with its named error or a 4xx,
and never crashes or answers 5xx."""

import json
import threading
import urllib.error
import urllib.request

import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings
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


@given(st.binary(max_size=300))
def test_bytes_round_trip_through_bits(data):
    assert bits_to_bytes(bytes_to_bits(data)) == data


@given(st.lists(st.integers(0, 1), max_size=200))
def test_any_bits_decode_or_raise_a_named_error(bits):
    try:
        bits_to_text(bits)
    except (ParityError, UnicodeDecodeError, ValueError):
        pass
    assert isinstance(bits_to_text(bits[: len(bits) // 9 * 9], errors="replace"), str)


@given(TEXT)
def test_any_python_string_encodes_or_is_refused_by_name(text):
    try:
        bits = text_to_bits(text)
    except UnicodeEncodeError:  # a lone surrogate: a str that UTF-8 cannot hold
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert bits_to_text(bits) == text


SECTIONS = {"model": ["d_model", "nhead", "num_layers", "dropout", "arch", "patch_bytes", "max_seq_len"],
            "train": ["lr", "batch_size", "max_steps", "diffusion_prob", "grad_clip", "epochs"],
            "data": ["window_bytes", "val_fraction", "shuffle_windows", "inputs"],
            "run": ["num_workers", "strategy", "threads_per_worker"]}  # fmt: skip


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.dictionaries(
        st.sampled_from(sorted(SECTIONS)),
        st.dictionaries(
            st.sampled_from(sorted({k for v in SECTIONS.values() for k in v}) + ["no_such_key"]), JSON, max_size=3
        ),
        max_size=3,
    )
)
def test_any_config_loads_or_is_refused_by_name(tmp_path, sections):
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(sections, allow_nan=True))  # JSON is YAML
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e)


@given(st.lists(st.tuples(st.sampled_from(["train.lr", "model.d_model", "run.strategy", "data.inputs", "x.y", "train"]),
                          st.text(max_size=20)), max_size=3))  # fmt: skip
def test_any_override_applies_or_is_refused_by_name(pairs):
    try:
        apply_overrides(load_config(None), [f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        assert str(e)


@pytest.fixture(scope="module")
def dashboard_url(checkpoints, tmp_path_factory):
    from serve.dashboard import make_server

    port = free_port()
    httpd = make_server("127.0.0.1", port, checkpoint=str(checkpoints / "good"), max_tokens=8,
                        runs_dir=tmp_path_factory.mktemp("runs"))  # fmt: skip
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


def _post(url: str, raw: bytes) -> int:
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        json.loads(e.read())  # an error body the API wrote, not a crash page
        return e.code


FIELDS = st.fixed_dictionaries(
    {"model": st.sampled_from(["bitlm", "other"]) | TEXT},
    optional={"prompt": TEXT | JSON, "max_tokens": BIG | JSON, "temperature": BIG, "top_p": BIG, "seed": BIG,
              "n": BIG, "stream": st.booleans() | JSON, "stop": JSON},
)  # fmt: skip


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(FIELDS, JSON))
def test_any_json_body_gets_a_4xx_or_an_answer_never_a_5xx(dashboard_url, body):
    raw = json.dumps(body, allow_nan=True).encode()  # NaN/Infinity as Python's json writes them
    status = _post(dashboard_url + "/v1/completions", raw)
    assert status < 500 and (status == 200 or 400 <= status < 500)


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 5000 + b"]" * 5000,  # deep nesting
        b'{"model": "bitlm", "prompt": "' + b"a" * 20_000_000 + b'"}',  # a 20 MB prompt
        b'{"model": "bitlm", "prompt": "\\udcff"}',  # valid JSON, not encodable as UTF-8
        b'{"model": "bitlm", "prompt": "hi", "seed": 18446744073709551616}',  # 2^64
        b'{"model": "bitlm", "prompt": "hi", "max_tokens": 1e30}',
        b"\xff\xfe not utf-8",
    ],
)
def test_hand_made_hostile_bodies_are_4xx(dashboard_url, raw):
    assert 400 <= _post(dashboard_url + "/v1/completions", raw) < 500
    assert _post(dashboard_url + "/v1/completions", b'{"model": "bitlm", "prompt": "x", "max_tokens": 1}') == 200
