"""Hostile input at volume, for benchmarks/faults.py: the strategies and checks of
tests/test_hostile_input.py (tests/hostile_cases.py) run ``total`` times in all, against the
codec, the config loader and the dashboard's server over real HTTP (its ``/v1/completions``,
as the test does, with a small untrained model: the input handling does not depend on the
weights). Hypothesis generates each case (no shrinking, no example database, a fixed seed); a
case counts as a crash when its check raises (an exception that is not the named error, a
failed assertion, a broken connection, a non-JSON error page), and HTTP answers are counted by
status class. Also reads schemathesis' counts from benchmarks/results/fuzz.json when it exists.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# Shares of the cases: the HTTP API takes the most, the loader next, the codec the rest.
SHARES = {"http_completions": 0.4, "config_file": 0.15, "config_overrides": 0.15,
          "codec_bytes": 0.1, "codec_bits": 0.1, "codec_text": 0.1}  # fmt: skip


def _run(strategy, check, n: int, seed: int) -> dict:
    """``check`` on ``n`` generated cases; counts and the first few crashes."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fix_seed

    out: dict = {"cases": 0, "crashes": 0, "crash_examples": [], "outcomes": Counter()}

    @fix_seed(seed)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def cases(case):
        out["cases"] += 1
        try:
            result = check(case)
        except Exception as e:  # noqa: BLE001 - a crash: counted, and the run goes on
            out["crashes"] += 1
            if len(out["crash_examples"]) < 5:
                out["crash_examples"].append(f"{type(e).__name__}: {e}"[:300] + f" <- {case!r}"[:300])
            return
        out["outcomes"][_outcome(result)] += 1

    start = time.time()
    cases()
    out["seconds"] = round(time.time() - start, 1)
    out["outcomes"] = dict(out["outcomes"])
    return out


def _outcome(result) -> str:
    if isinstance(result, int):  # an HTTP status
        return "5xx" if result >= 500 else ("4xx" if result >= 400 else str(result))
    return "ok"


def _fuzz_json() -> dict | None:
    path = ROOT / "benchmarks" / "results" / "fuzz.json"
    if not path.exists():
        return None
    fuzz = json.loads(path.read_text())
    report = fuzz.get("report") or {}
    return {
        "summary_line": fuzz.get("summary_line"),
        "max_examples": fuzz.get("max_examples"),
        "exit_code": fuzz.get("exit_code"),
        "server_errors_reported": fuzz.get("server_errors_reported"),
        "report_keys": sorted(report)[:20] if isinstance(report, dict) else None,
    }


def hostile_input(total: int, seed: int = 0) -> dict:
    import hostile_cases as cases
    import torch

    from bitlm import BitTransformerLM
    from serve.dashboard import make_server

    torch.manual_seed(0)
    model = BitTransformerLM(
        d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=576, arch="byte_patch", patch_bytes=2
    )
    n = {k: max(1, round(total * share)) for k, share in SHARES.items()}
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        model.save_pretrained(work / "ckpt")
        torch.set_num_threads(1)
        httpd = make_server("127.0.0.1", 0, checkpoint=str(work / "ckpt"), max_tokens=8, runs_dir=work / "runs")
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1/completions"
        try:
            suites = {
                "codec_bytes": _run(cases.BYTES, cases.bytes_round_trip, n["codec_bytes"], seed),
                "codec_bits": _run(cases.BITS, cases.bits_decode, n["codec_bits"], seed),
                "codec_text": _run(cases.TEXT, cases.text_encode, n["codec_text"], seed),
                "config_file": _run(cases.CONFIGS, lambda c: cases.config_loads(c, work), n["config_file"], seed),
                "config_overrides": _run(cases.OVERRIDES, cases.override_applies, n["config_overrides"], seed),
                "http_completions": _run(cases.BODIES, lambda b: _status(cases, url, b), n["http_completions"], seed),
            }
            hand = {}
            for raw in cases.HAND_MADE:
                try:
                    hand[_describe(raw)] = cases.post(url, raw)
                except Exception as e:  # noqa: BLE001 - a crash, reported
                    hand[_describe(raw)] = f"crash: {type(e).__name__}"
        finally:
            httpd.shutdown()
            httpd.server_close()
    http = suites["http_completions"]["outcomes"]
    return {
        "cases": sum(s["cases"] for s in suites.values()) + len(hand),
        "crashes": sum(s["crashes"] for s in suites.values()) + sum(isinstance(v, str) for v in hand.values()),
        "http_cases": suites["http_completions"]["cases"] + len(hand),
        "http_5xx": http.get("5xx", 0) + sum(isinstance(v, int) and v >= 500 for v in hand.values()),
        "suites": suites,
        "hand_made_bodies": hand,
        "schemathesis": _fuzz_json() or "benchmarks/results/fuzz.json absent (python benchmarks/fuzz.py writes it)",
    }


def _status(cases, url: str, body) -> int:
    """The status of a generated body: a 5xx is returned (counted), anything else not 200 or
    4xx raises (a crash)."""
    status = cases.post(url, json.dumps(body, allow_nan=True).encode())
    if status != 200 and not 400 <= status < 600:
        raise AssertionError(f"status {status}")
    return status


def _describe(raw: bytes) -> str:
    return f"{len(raw):,} bytes: {raw[:24]!r}{'...' if len(raw) > 24 else ''}"
