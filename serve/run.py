"""Run the Serve application locally with Prometheus metrics on a pinned port.

    python serve/run.py [--config serve/config.yaml] [--checkpoint DIR] [--metrics-port 8080]

``serve run serve/config.yaml`` works as well; this launcher also pins Ray's metrics export
port (``--metrics-port``, default 8080) so Prometheus can scrape ``http://127.0.0.1:8080``
(bitlm_requests_total, bitlm_generated_bytes_total, bitlm_request_latency_ms,
bitlm_gate_blocks_total), and trains the demo checkpoint first if it is missing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "serve" / "config.yaml"))
    ap.add_argument("--checkpoint", help="overrides the config's checkpoint")
    ap.add_argument("--metrics-port", type=int, default=8080)
    ap.add_argument("--port", type=int, help="overrides the config's HTTP port")
    args = ap.parse_args(argv)
    config = yaml.safe_load(Path(args.config).read_text())
    app_cfg = config["applications"][0]
    checkpoint = args.checkpoint or app_cfg["args"]["checkpoint"]
    if not Path(checkpoint).exists() and "://" not in checkpoint and ":/" not in checkpoint:
        print(f"{checkpoint} does not exist: training the demo model first")
        from pipelines import demo

        out = demo.main([])
        checkpoint = out["train"]["checkpoint"]
        Path(app_cfg["args"]["checkpoint"]).parent.mkdir(parents=True, exist_ok=True)
        link = ROOT / app_cfg["args"]["checkpoint"]
        if not link.exists():
            link.symlink_to(Path(checkpoint).resolve())
    import ray
    from ray import serve

    from serve.app import build

    if not ray.is_initialized():
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            num_cpus=4,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _metrics_export_port=args.metrics_port,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    http = {**config.get("http_options", {}), **({"port": args.port} if args.port else {})}
    serve.start(http_options=http)
    deployments = {d["name"]: d for d in app_cfg.get("deployments", [])}
    gate = deployments.get("BitLMModel", {}).get("user_config", {}).get("gate", {})
    app = build({**app_cfg["args"], "checkpoint": str(checkpoint), "gate": gate})
    serve.run(app, name=app_cfg["name"], route_prefix=app_cfg.get("route_prefix", "/"))
    print(f"serving on http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}  (playground: /, API: /docs)")
    print(f"Prometheus metrics on http://127.0.0.1:{args.metrics_port}/metrics")
    if os.environ.get("BITLM_API_KEY"):
        print("API key on (BITLM_API_KEY): send Authorization: Bearer <key>; a browser opens /?key=<key> once")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
