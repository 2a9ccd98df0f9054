"""Where a served completion's time goes beyond the generation itself, one run.

    python benchmarks/serve_overhead.py [--out benchmarks/results/serve_overhead.json] [--pairs 12]

The demo-size model (untrained, int8 as Serve runs it, gate floors 0 as in serve_bench.py),
completions of 1, 16 and 64 bytes, each length timed ``--pairs`` times three ways in turn:
``bitlm.gated.complete`` in this process (the generation alone); the replica's decoding loop
(serve/decoder.py) in this process, without Ray (its thread, gathering and shared batch); and
over HTTP through the Serve application (proxy -> ingress -> model replica). A straight line
through the three lengths' medians splits each way into a cost per request and a cost per
byte (the JSON keeps each fit's residuals: with three lengths and a drifting machine, a few
ms); the differences between the lines say what the decoding loop and Serve add to each.
Also GET /health (proxy -> ingress -> model -> back, no generation) and GET /v1/models (proxy ->
ingress -> back: the model replica's hop is the difference).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_bench import OPEN_GATE, PROMPT, post  # noqa: E402

LENGTHS = (1, 16, 64)


def line(points: dict[int, float]) -> dict[str, float]:
    """Least squares ms = per_request + per_byte * bytes."""
    xs, ys = list(points), list(points.values())
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"per_request_ms": my - slope * mx, "per_byte_ms": slope}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/serve_overhead.json")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--config", default="small.yaml")
    args = ap.parse_args()
    import ray
    import torch
    from ray import serve

    from bitlm import BitTransformerLM, load_config
    from bitlm.gated import GateSettings, complete
    from bitlm.quantization import prepare_fused, quantize_dynamic
    from pipelines.common import init_ray
    from serve.app import build
    from serve.decoder import Decoder

    cfg = load_config(ROOT / "configs" / args.config)
    torch.manual_seed(0)
    model = BitTransformerLM(config=cfg.model).eval()
    gate = GateSettings(**OPEN_GATE)
    prompt = PROMPT.encode()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        torch.set_num_threads(1)  # as a replica runs (serve/deployment.py)
        q = quantize_dynamic(model)
        prepare_fused("cpu")
        decoder = Decoder(q, 16, 0.01)  # serve/config.yaml's max_batch_size and batch_wait_timeout_s
        loop = asyncio.new_event_loop()

        async def via_decoder(n: int) -> None:
            request = {"prompt": prompt, "max_new_bytes": n, "temperature": 1.0, "top_p": 1.0, "seed": 0}
            async for _ in decoder.events({**request, "strategy": "sample"}, True, gate.open()):
                pass

        init_ray(quiet=True)
        port = 8766
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = {"checkpoint": d, "quantization": "int8", "gate": OPEN_GATE, "max_batch_size": 16}
        serve.run(build({**app, "batch_wait_timeout_s": 0.01}), name="overhead", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        body = {"model": "bitlm", "prompt": PROMPT, "temperature": 1.0, "seed": 0}  # as the other two ways
        ways = {
            "in_process": lambda n: complete(q, prompt, n, seed=0, gate=gate),
            "decoding_loop": lambda n: loop.run_until_complete(via_decoder(n)),
            "http": lambda n: post(f"{url}/v1/completions", {**body, "max_tokens": n}),
        }
        for n in LENGTHS:  # warm-up
            for way in ways.values():
                way(n)
        times: dict[str, dict[int, list[float]]] = {w: {n: [] for n in LENGTHS} for w in ways}
        for _ in range(args.pairs):
            for n in LENGTHS:
                for name, way in ways.items():
                    t = time.perf_counter()
                    way(n)
                    times[name][n].append(1000 * (time.perf_counter() - t))
        gets: dict[str, list[float]] = {"/health": [], "/v1/models": []}
        for _ in range(args.pairs):
            for route, ms in gets.items():  # alternating
                t = time.perf_counter()
                with urllib.request.urlopen(f"{url}{route}") as r:
                    r.read()
                ms.append(1000 * (time.perf_counter() - t))
        serve.shutdown()
        ray.shutdown()
        loop.close()
    medians = {w: {n: statistics.median(v) for n, v in by_n.items()} for w, by_n in times.items()}
    fits = {w: line(m) for w, m in medians.items()}
    result = {
        "model": {"config": args.config, "arch": cfg.model.arch, "d_model": cfg.model.d_model, "quantization": "int8"},
        "pairs": args.pairs,
        "p50_ms": {w: {str(n): round(v, 2) for n, v in m.items()} for w, m in medians.items()},
        "fit": {w: {k: round(v, 3) for k, v in f.items()} for w, f in fits.items()},
        "fit_residual_ms": {  # measured - fitted, per length: how far a straight line explains each way
            w: {str(n): round(v - fits[w]["per_request_ms"] - fits[w]["per_byte_ms"] * n, 2) for n, v in m.items()}
            for w, m in medians.items()
        },
        "added": {
            "decoding_loop_over_in_process": {
                k: round(fits["decoding_loop"][k] - fits["in_process"][k], 3) for k in fits["in_process"]
            },
            "serve_over_decoding_loop": {k: round(fits["http"][k] - fits["decoding_loop"][k], 3) for k in fits["http"]},
        },
        "http_vs_in_process_64_bytes": round(medians["http"][64] / medians["in_process"][64], 3),
        "health_p50_ms": round(statistics.median(gets["/health"]), 2),
        "models_p50_ms": round(statistics.median(gets["/v1/models"]), 2),  # no model replica in it
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
