"""`ray job submit` of pipelines/train.py against a cluster started with `ray start --head`.

The cluster is this test's own: its processes carry a marker in their environment, and the
test stops exactly those (never `ray stop`, which would kill every Ray on the machine).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(marker: str, temp_dir: str) -> list[int]:
    """Processes of this cluster: the marker in their environment, or its temp dir in their
    command line or open files (Ray's agents run with a reduced environment)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (
                marker.encode() in (entry / "environ").read_bytes()
                or temp_dir.encode() in (entry / "cmdline").read_bytes()
            ):
                pids.append(int(entry.name))
                continue
            if any(os.readlink(fd).startswith(temp_dir) for fd in (entry / "fd").iterdir()):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _stop(marker: str, temp_dir: str) -> None:
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        for pid in _cluster_pids(marker, temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while _cluster_pids(marker, temp_dir) and time.time() < deadline:
            time.sleep(0.5)


def test_ray_job_submit_trains_and_logs(tmp_path):
    marker = f"BITLM_TEST_CLUSTER={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        {
            "PATH": f"{VENV_BIN}:{env.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            marker.split("=")[0]: marker.split("=")[1],
        }
    )
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    port, dashboard = _port(), _port()
    head = subprocess.Popen(
        [
            str(VENV_BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            f"--dashboard-port={dashboard}",
            # Its own agent port: the test session's Ray already listens on the default 52365,
            # and a head whose agent cannot bind answers every submit "No available agent".
            f"--dashboard-agent-listen-port={_port()}",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--num-cpus=4",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    t0 = time.time()
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                time.sleep(1)
        print(f"cluster up in {time.time() - t0:.0f} s")
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
        command = [
            str(VENV_BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "pipelines/train.py", "--config", "configs/tiny.yaml",
            "--set", f"run.storage_path={tmp_path / 'store'}", "--set", f"data.output_dir={tmp_path / 'data'}",
            "--set", "train.max_steps=4", "--set", "data.window_bytes=16",
        ]  # fmt: skip
        for _ in range(30):  # the dashboard answers before its job agent is ready on a busy machine
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent to submit job" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        print(f"job done at {time.time() - t0:.0f} s")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "succeeded" in done.stdout + done.stderr
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        runs = client.search_runs([client.get_experiment_by_name("bitlm").experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        assert runs[0].data.metrics["loss"] > 0 and "checkpoint" in {
            a.path for a in client.list_artifacts(runs[0].info.run_id)
        }
    finally:
        head.send_signal(signal.SIGTERM)
        _stop(marker, temp_dir)
    assert _cluster_pids(marker, temp_dir) == []
