"""Hostile input, generated (Hypothesis): the codec, the config loader and the HTTP API (the
dashboard's server over real HTTP) meet numbers out of machine range, NaN, lone surrogates,
deep nesting and big bodies. Each refuses what it cannot take with its named error or a 4xx,
and never crashes or answers 5xx. The strategies and checks are tests/hostile_cases.py's
(benchmarks/faults.py runs them ten thousand times)."""

import threading

import hostile_cases as cases
import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings


@given(cases.BYTES)
def test_bytes_round_trip_through_bits(data):
    cases.bytes_round_trip(data)


@given(cases.BITS)
def test_any_bits_decode_or_raise_a_named_error(bits):
    cases.bits_decode(bits)


@given(cases.TEXT)
def test_any_python_string_encodes_or_is_refused_by_name(text):
    cases.text_encode(text)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases.CONFIGS)
def test_any_config_loads_or_is_refused_by_name(tmp_path, sections):
    cases.config_loads(sections, tmp_path)


@given(cases.OVERRIDES)
def test_any_override_applies_or_is_refused_by_name(pairs):
    cases.override_applies(pairs)


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


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases.BODIES)
def test_any_json_body_gets_a_4xx_or_an_answer_never_a_5xx(dashboard_url, body):
    cases.body_answered(dashboard_url + "/v1/completions", body)


@pytest.mark.parametrize("raw", cases.HAND_MADE)
def test_hand_made_hostile_bodies_are_4xx(dashboard_url, raw):
    assert 400 <= cases.post(dashboard_url + "/v1/completions", raw) < 500
    assert cases.post(dashboard_url + "/v1/completions", b'{"model": "bitlm", "prompt": "x", "max_tokens": 1}') == 200
