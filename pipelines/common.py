"""What the platform's entrypoints share: Ray start-up, cluster path checks, prepared-shard
reading (MLflow is pipelines/tracking.py).

Functions here run on the driver and inside Ray workers. The entrypoints register the
``pipelines`` package for pickling by value, so workers on any node need only ``bitlm`` and the
pinned dependencies installed, not this checkout on their path.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bitlm.digest import file_sha256

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # shards of window bytes (1: packed bits)


# -- Ray -------------------------------------------------------------------------------------


def init_ray(num_cpus: int | None = None, quiet: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS (or the job's cluster under ``ray job submit``), else
    start a local one. Local clusters get logical CPUs (default 4 on a 2-core machine) so two
    training workers and Ray Data tasks can be scheduled together. ``quiet``: Ray's INFO logs
    off in this process (workers' errors still reach it as exceptions)."""
    import ray
    from ray import cloudpickle

    import pipelines

    cloudpickle.register_pickle_by_value(pipelines)  # Ray's own cloudpickle, not the PyPI one
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")
    level = {"logging_level": logging.ERROR, "log_to_driver": False} if quiet else {}
    if quiet:  # its warnings too (token authentication is on, progress bars are off): by design
        logging.getLogger("ray").setLevel(logging.ERROR)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**{"log_to_driver": True, **level})
    else:
        num_cpus = num_cpus or max(4, os.cpu_count() or 1)
        # Worker processes may start as many at a time as there are logical CPUs: at Ray's
        # default (the physical cores) a training run's first seconds start ~10 and the raylet
        # warns of "4x the maximum expected startup concurrency" into the driver's output.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(num_cpus))
        # Ray Data reads parquet footers with a pool of actors, 32 by default, each a process of
        # ~100 MB that a 2-worker training run held beside its own; the cluster's processes
        # inherit this environment.
        os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
        # The raylet keeps up to one idle worker process per logical CPU (~100-150 MB each,
        # holding the modules of the tasks they ran) after Ray Data's tasks end; with no such
        # floor an idle worker exits after 1 s unless it owns objects in use. Measured (README,
        # benchmarks/scale.py): 0.4 GB less PSS in a preparation, 0.25 GB in training, no slower.
        os.environ.setdefault("RAY_num_workers_soft_limit", "0")
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            # Tasks and actors that import the entrypoints' modules (Tune trials do) find them.
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
            **level,
        )
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    if quiet:  # Ray Data configures its own logger when imported ("Dataset ... execution finished")
        logging.getLogger("ray.data").setLevel(logging.ERROR)


def storage_path(path: str) -> str:
    """Absolute local path (Ray Train needs one) or a URI (s3://, gs://, ...) as given."""
    return path if "://" in path else str(Path(path).resolve())


def check_cluster_paths(paths: dict[str, str], mlflow_uri: str | None = None) -> None:
    """Fail up front, naming the setting, when a run on more than one node is given a path or
    MLflow store that some node cannot see. On one node everything is visible and this does
    nothing. A local path must lie outside every node's Ray temp dir (a job's working-dir
    copy lives there and is private to its node), and a marker file written here must be
    readable from a task pinned to each other node (what an NFS mount gives; s3:// and gs://
    URIs are visible by construction). A local SQLite MLflow store is refused: rank 0 may run
    on another node; use a tracking server (cluster/local starts one on the head)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    hint = "use a directory every node mounts (NFS) or an s3:// / gs:// URI"
    if mlflow_uri is not None and mlflow_uri.startswith("sqlite:"):
        raise SystemExit(
            f"MLflow store {mlflow_uri} is a file on this node, and this cluster has {len(nodes)} nodes: "
            "set MLFLOW_TRACKING_URI to a tracking server every node reaches (http://<head>:5000)"
        )
    temp_dirs = {Path(n["ObjectStoreSocketName"]).parents[2] for n in nodes if n.get("ObjectStoreSocketName")}
    here = ray.get_runtime_context().get_node_id()

    @ray.remote(num_cpus=0)
    def visible(path: str) -> bool:
        return os.path.exists(path)

    for setting, path in paths.items():
        if "://" in path:
            continue
        resolved = Path(path).resolve()
        for temp in temp_dirs:
            if resolved.is_relative_to(temp):
                raise SystemExit(
                    f"{setting}={path} resolves to {resolved}, inside Ray's per-node directory {temp} "
                    f"(a relative path under `ray job submit` lands in the head's copy of the working dir), "
                    f"which the other nodes do not see: {hint}"
                )
        resolved.mkdir(parents=True, exist_ok=True)
        marker = resolved / f".bitlm-visible-{uuid.uuid4().hex}"
        marker.touch()
        try:
            for n in nodes:
                if n["NodeID"] == here:
                    continue
                pin = NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
                if not ray.get(visible.options(scheduling_strategy=pin).remote(str(marker)), timeout=120):
                    raise SystemExit(f"{setting}={path} is not visible from node {n['NodeManagerAddress']}: {hint}")
        finally:
            marker.unlink(missing_ok=True)


# -- prepared shards -------------------------------------------------------------------------


class DataError(ValueError):
    """A prepared-data directory that cannot be used (missing, corrupt, or empty)."""


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared-data directory; a missing or unreadable one is a DataError
    that names the file."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir} holds no prepared data ({MANIFEST} missing): run pipelines/prepare_data.py first")
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("shards"), list) or not all(
            "file" in s and "split" in s for s in manifest["shards"]
        ):
            raise ValueError("no list of shards with file and split")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({type(e).__name__}: {e}): prepare the data again") from None
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path} describes shards of format version {manifest.get('version')}; this bitlm reads version "
            f"{FORMAT_VERSION} (windows of bytes): prepare the data again"
        )
    return manifest


def shard_paths(data_dir: str | Path, split: str, verify: bool = True) -> list[str]:
    """The split's shard files; with ``verify`` each is checked against the SHA-256 the manifest
    recorded when it was written, and a missing or changed shard is a DataError naming it."""
    manifest = read_manifest(data_dir)
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        raise DataError(f"{data_dir} has no {split} shards")
    paths = []
    for shard in shards:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing ({Path(data_dir) / MANIFEST} lists it): prepare the data again")
        if verify and "sha256" in shard and file_sha256(path) != shard["sha256"]:
            raise DataError(
                f"shard {path} is corrupt: its SHA-256 differs from the one {MANIFEST} recorded when it was written"
            )
        paths.append(str(path))
    return paths


def window_bytes(column: Any) -> np.ndarray:
    """A shard's ``bytes`` column (equal-length binary values, as Ray Data or pyarrow give it)
    -> uint8 array (rows, window bytes), without a copy per row where the column allows."""
    if isinstance(column, np.ndarray) and column.dtype != object and column.ndim == 2:
        return column.astype(np.uint8, copy=False)
    import pyarrow as pa

    if isinstance(column, (pa.Array, pa.ChunkedArray)):
        column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        column = column.cast(pa.binary())
        n = len(column)
        if n == 0:
            return np.zeros((0, 0), np.uint8)
        offsets = np.frombuffer(column.buffers()[1], np.int32)[column.offset : column.offset + n + 1]
        data = np.frombuffer(column.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
        return data.reshape(n, -1)
    rows = list(column)
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), -1)
