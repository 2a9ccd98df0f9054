"""pipelines/common.py's local cluster (init_ray), on the session's real Ray cluster."""

import os
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_local_clusters_idle_task_workers_exit(ray_session):
    """The raylet keeps no floor of idle workers (RAY_num_workers_soft_limit=0): processes that
    ran tasks, and own nothing, exit about a second after their last task instead of waiting
    idle, one per logical CPU, for more (Ray's default)."""
    ray = ray_session

    @ray.remote(num_cpus=1)
    def worker_pid() -> int:
        time.sleep(0.5)  # four at once: four worker processes
        return os.getpid()

    pids = set(ray.get([worker_pid.remote() for _ in range(4)]))
    assert len(pids) == 4
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.25)
    assert not [p for p in pids if _alive(p)]
