"""Fuzz the Serve application's HTTP API from its own OpenAPI schema with schemathesis.

    python benchmarks/fuzz.py [--out benchmarks/results/fuzz.json] [--max-examples 50] [--max-time 600]

Starts a local Ray cluster and the Serve application (serve/app.py) on loopback with a small
untrained model of the demo's architecture (the API's input handling does not depend on the
weights), then runs ``schemathesis run <base>/openapi.json`` bounded in examples per operation
and in total time, with the checks that matter for a public API: no 5xx
(``not_a_server_error``), every status code documented (``status_code_conformance``), and
responses that match their declared schema (``response_schema_conformance``). Writes the counts
from schemathesis' JSON report and its summary line; exits non-zero when any check failed.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/fuzz.json")
    ap.add_argument("--max-examples", type=int, default=50, help="test cases per operation and phase")
    ap.add_argument("--max-time", type=int, default=600, help="seconds for the whole schemathesis run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import ray
    import torch
    from ray import serve

    from bitlm import BitTransformerLM
    from pipelines.common import init_ray
    from serve.app import build

    torch.manual_seed(0)
    model = BitTransformerLM(
        d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=576, arch="byte_patch", patch_bytes=4
    )
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        init_ray()
        port = 8766
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # Small limits so generated requests stay cheap; the limits themselves are fuzzed too.
        serve.run(
            build({"checkpoint": d, "max_prompt_bytes": 256, "max_tokens": 32, "quantization": "int8"}),
            name="bitlm",
            route_prefix="/",
        )
        base = f"http://127.0.0.1:{port}"
        urllib.request.urlopen(base + "/health", timeout=60)
        report = Path(d) / "report.json"
        cmd = [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{base}/openapi.json",
            "--checks",
            CHECKS,
            "--max-examples",
            str(args.max_examples),
            "--max-time",
            str(args.max_time),
            "--seed",
            str(args.seed),
            "--workers",
            "2",
            "--request-timeout",
            "120",
            "--generation-database",
            "none",
            "--no-color",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ]
        print("$", " ".join(cmd[1:]), flush=True)
        start = time.time()
        done = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.time() - start
        print(done.stdout[-6000:], done.stderr[-2000:], sep="\n")
        summary_lines = [ln.strip() for ln in done.stdout.splitlines() if re.search(r"\b(passed|failed)\b", ln)]
        result = {
            "command": "schemathesis " + " ".join(cmd[1:-2]),
            "checks": CHECKS.split(","),
            "max_examples": args.max_examples,
            "seconds": elapsed,
            "exit_code": done.returncode,
            "summary_line": summary_lines[-1] if summary_lines else None,
            "report": json.loads(report.read_text()) if report.exists() else None,
        }
        serve.shutdown()
        ray.shutdown()
    server_errors = len(re.findall(r"Server error", done.stdout))
    result["server_errors_reported"] = server_errors
    result["goals"] = {"no_failed_checks": done.returncode == 0, "zero_server_errors": server_errors == 0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    sys.exit(done.returncode)


if __name__ == "__main__":
    main()
