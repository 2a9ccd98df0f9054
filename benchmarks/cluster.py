"""Training throughput on the cluster/local 2-node cluster: 2 workers on 2 nodes vs on 1 node.

    sudo python benchmarks/cluster.py [--out benchmarks/results/cluster.json] [--steps 150]

Brings up cluster/local (two network namespaces on this machine; needs root), submits the same
2-worker training job twice with `ray job submit` -- placement SPREAD (one worker per node,
gradients all-reduced over the veth link) and STRICT_PACK (both workers on the head) -- and reads
each run's throughput (bits/s, median of the logged values after the first) back through the
head's MLflow server. Then tears the cluster down.

A functional check, not a scaling claim: both "nodes" share this machine's CPU cores, so the
2-node run cannot be faster than the cores allow; what it shows is the cost of the network hop
and that the same job runs unchanged across nodes.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
HEAD_IP = "10.233.0.1"
NS = {"BITLM_NS_HEAD": "bitlm-b-head", "BITLM_NS_WORKER": "bitlm-b-worker"}


def throughput(env: dict, run_id: str) -> float:
    script = (
        "import json, statistics; from mlflow.tracking import MlflowClient; "
        f"h = MlflowClient('http://{HEAD_IP}:5000').get_metric_history('{run_id}', 'throughput_bits_per_s'); "
        "v = [m.value for m in sorted(h, key=lambda m: m.step)][1:]; print(json.dumps(v))"
    )
    out = subprocess.run(
        ["ip", "netns", "exec", NS["BITLM_NS_HEAD"], str(VENV / "bin" / "python"), "-c", script],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return statistics.median(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/cluster.json")
    ap.add_argument("--config", default="configs/small.yaml")
    ap.add_argument("--steps", type=int, default=150)
    args = ap.parse_args()
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise SystemExit("benchmarks/cluster.py needs root and iproute2 (network namespaces)")
    cluster_dir = tempfile.mkdtemp(prefix="blb", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(NS, BITLM_CLUSTER_DIR=cluster_dir, BITLM_HEAD_IP=HEAD_IP, BITLM_WORKER_IP="10.233.0.2", VENV=str(VENV))
    subprocess.run(["make", "-s", "cluster-up"], cwd=ROOT, env=env, check=True)
    results = {}
    try:
        for placement in ("SPREAD", "STRICT_PACK"):
            job = [
                "python",
                "pipelines/train.py",
                "--config",
                args.config,
                "--set",
                "run.num_workers=2",
                "--set",
                f"run.placement_strategy={placement}",
                "--set",
                f"train.max_steps={args.steps}",
                "--set",
                "train.max_seconds=null",
                "--set",
                "train.log_every=10",
                "--set",
                f"run.checkpoint_every={args.steps}",
            ]
            done = subprocess.run(
                ["bash", "cluster/local/submit.sh", "--", *job], cwd=ROOT, env=env, capture_output=True, text=True
            )
            if done.returncode != 0:
                raise SystemExit(f"{placement} job failed:\n{done.stdout[-3000:]}\n{done.stderr[-2000:]}")
            run_id = re.search(r"MLflow run (\w+) at http://", done.stdout).group(1)
            nodes = ast.literal_eval(re.search(r"workers on nodes (\[.*?\])", done.stdout).group(1))
            results[placement] = {"run_id": run_id, "worker_nodes": nodes, "bits_per_s": throughput(env, run_id)}
            print(placement, results[placement], flush=True)
    finally:
        subprocess.run(["make", "-s", "cluster-down"], cwd=ROOT, env=env)
        shutil.rmtree(cluster_dir, ignore_errors=True)
    ratio = results["SPREAD"]["bits_per_s"] / results["STRICT_PACK"]["bits_per_s"]
    out = {
        "config": args.config,
        "steps": args.steps,
        "two_nodes": results["SPREAD"],
        "one_node": results["STRICT_PACK"],
        "two_node_over_one_node": ratio,
        "caveat": "both namespaces share this machine's 2 CPU cores: a functional check, not a scaling claim",
        "goals": {"spread_used_two_nodes": len(set(results["SPREAD"]["worker_nodes"])) == 2, "ratio": ratio},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
