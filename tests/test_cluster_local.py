"""cluster/local: a real 2-node Ray cluster in two network namespaces on this machine.

`make cluster-up`, then `ray job submit` (cluster/local/submit.sh) of a 2-worker training run
spread over both nodes, logging to the head's MLflow server and checkpointing to the shared
storage; the run is read back through the server from the worker's namespace; a run whose
worker node loses its raylet mid-run recovers as its FailureConfig says; a storage path the
other node cannot see is refused up front; `make cluster-down` leaves nothing behind.

Needs root (network namespaces). Elsewhere the module is skipped with that reason; CI runs as
root, so there it runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None,
    reason="needs root and iproute2 for network namespaces (CI runs as root)",
)

HEAD_IP, WORKER_IP = "10.232.7.1", "10.232.7.2"
NS_HEAD, NS_WORKER = "bitlm-t-head", "bitlm-t-worker"
TRAIN = [
    "python",
    "pipelines/train.py",
    "--config",
    "configs/tiny.yaml",
    "--set",
    "run.num_workers=2",
    "--set",
    "run.placement_strategy=SPREAD",
    "--set",
    "run.cpus_per_worker=1",
]


def _namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _ns_pids(ns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.fixture(scope="module")
def cluster():
    if {NS_HEAD, NS_WORKER} & _namespaces():
        pytest.fail(f"namespaces {NS_HEAD}/{NS_WORKER} exist already: a previous run did not tear down")
    cluster_dir = tempfile.mkdtemp(prefix="blc", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(
        BITLM_CLUSTER_DIR=cluster_dir,
        BITLM_NS_HEAD=NS_HEAD,
        BITLM_NS_WORKER=NS_WORKER,
        BITLM_HEAD_IP=HEAD_IP,
        BITLM_WORKER_IP=WORKER_IP,
        VENV=str(VENV),
    )
    up = subprocess.run(["make", "-s", "cluster-up"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "cluster up: 2 nodes" in up.stdout, up.stdout
        yield env, Path(cluster_dir)
    finally:
        down = subprocess.run(["make", "-s", "cluster-down"], cwd=ROOT, env=env, capture_output=True, text=True)
        print(down.stdout, down.stderr)
        shutil.rmtree(cluster_dir, ignore_errors=True)


def _in_ns(env, ns: str, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
    full_env = {
        **env,
        "PATH": f"{VENV / 'bin'}:{env['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": f"{env['BITLM_CLUSTER_DIR']}/auth_token",
        "RAY_ADDRESS": f"http://{HEAD_IP}:8265",
        "MLFLOW_TRACKING_URI": f"http://{HEAD_IP}:5000",
    }
    return subprocess.run(
        ["ip", "netns", "exec", ns, *cmd], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _submit(env, *train_args: str, wait: bool = True) -> subprocess.CompletedProcess:
    opts = [] if wait else ["--no-wait"]
    return subprocess.run(
        ["bash", "cluster/local/submit.sh", *opts, "--", *train_args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _read_run(env, run_id: str) -> dict:
    """The MLflow run, read through the head's server from the worker's namespace."""
    script = f"""
import json
from mlflow.tracking import MlflowClient
c = MlflowClient("http://{HEAD_IP}:5000")
r = c.get_run("{run_id}")
arts = [a.path for a in c.list_artifacts("{run_id}", "checkpoint")]
steps = [m.step for m in c.get_metric_history("{run_id}", "loss")]
print(json.dumps({{"status": r.info.status, "tags": r.data.tags, "metrics": r.data.metrics,
                   "checkpoint": arts, "loss_steps": steps}}))
"""
    out = _in_ns(env, NS_WORKER, str(VENV / "bin" / "python"), "-c", script, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_job_spreads_over_both_nodes_logs_to_the_server_and_checkpoints_to_shared_storage(cluster):
    env, cluster_dir = cluster
    done = _submit(env, *TRAIN, "--set", "train.max_steps=12", "--set", "run.checkpoint_every=6")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    run_id = re.search(r"MLflow run (\w+) at http://", done.stdout).group(1)
    run = _read_run(env, run_id)
    assert run["status"] == "FINISHED"
    assert set(run["tags"]["worker_node_ips"].split(",")) == {HEAD_IP, WORKER_IP}
    assert max(run["loss_steps"]) == 12 and 0 < run["metrics"]["val_bpb"] < 20
    assert {"checkpoint/model.safetensors", "checkpoint/config.json"} <= set(run["checkpoint"])
    name = run["tags"]["ray_run_name"]
    assert list((cluster_dir / "shared" / "ray" / name).glob("checkpoint_*")), "no checkpoint in shared storage"
    assert (cluster_dir / "shared" / "data" / "prepared" / "manifest.json").exists()


def test_a_storage_path_only_the_head_sees_is_refused_up_front(cluster):
    env, _ = cluster
    # A relative path under `ray job submit` lands in the head's copy of the working dir.
    done = _submit(env, *TRAIN, "--set", "run.storage_path=runs/ray")
    assert done.returncode != 0
    assert "run.storage_path=runs/ray" in done.stdout and "other nodes do not see" in done.stdout, done.stdout[-3000:]


def test_a_worker_node_lost_mid_run_fails_over_and_the_run_finishes(cluster):
    env, cluster_dir = cluster
    steps = 160  # the kill comes at the first checkpoint (step 20); the rest runs on the head
    submitted = _submit(
        env,
        *TRAIN,
        "--set",
        f"train.max_steps={steps}",
        "--set",
        "run.checkpoint_every=20",
        "--set",
        "run.max_failures=1",
        "--set",
        "train.eval_every=100",
        "--name",
        "failover",
        wait=False,
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"raysubmit_\w+", submitted.stdout).group(0)
    shared = cluster_dir / "shared" / "ray"
    deadline = time.time() + 300
    while time.time() < deadline and not list(shared.glob("failover/checkpoint_*")):
        time.sleep(1)
    assert list(shared.glob("failover/checkpoint_*")), "no checkpoint appeared"
    raylets = [p for p in _ns_pids(NS_WORKER) if b"raylet" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]]
    assert raylets, "no raylet in the worker namespace"
    for pid in raylets:
        os.kill(pid, signal.SIGKILL)
    logs = _in_ns(env, NS_HEAD, "ray", "job", "logs", "--follow", job_id, timeout=900)
    status = _in_ns(env, NS_HEAD, "ray", "job", "status", job_id, timeout=60)
    assert "succeeded" in status.stdout.lower(), status.stdout + logs.stdout[-4000:]
    run_id = re.search(r"MLflow run (\w+) at http://", logs.stdout).group(1)
    run = _read_run(env, run_id)
    assert run["status"] == "FINISHED" and max(run["loss_steps"]) == steps
    assert run["tags"]["worker_node_ips"] == f"{HEAD_IP},{HEAD_IP}", "after the failover both workers run on the head"
    assert "recovered from 1 worker group failure" in logs.stdout, logs.stdout[-4000:]


def test_cluster_down_leaves_no_process_or_namespace(cluster):
    env, cluster_dir = cluster
    pids = _ns_pids(NS_HEAD) + _ns_pids(NS_WORKER)
    assert pids, "the cluster should be running before teardown"
    down = subprocess.run(["make", "-s", "cluster-down"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert down.returncode == 0, down.stderr
    assert not {NS_HEAD, NS_WORKER} & _namespaces()
    assert not [p for p in pids if _running(p)], "processes left behind"


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a killed process its parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
