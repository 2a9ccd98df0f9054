"""Ray Train checkpoints of a training worker: save (a collective) and restore.

A checkpoint is a bitlm checkpoint directory (``config.json`` + ``model.safetensors``, the whole
model gathered on rank 0 under every strategy) plus ``training_state.pt``: the optimizer (whole,
gathered from FSDP shards; per stage in ``optimizer_rank<r>.pt`` under the pipeline strategy),
the step, the data position, the trainer's generator, and the step the model last grew.
"""

from __future__ import annotations

import errno
import tempfile
from pathlib import Path
from typing import Any

import torch

from bitlm.checkpoint import CheckpointError, load_training_state, read_config, save_training_state
from bitlm.model import load_pretrained, save_pretrained


def load(rank: int) -> dict[str, Any] | None:
    """The latest good checkpoint of this Ray Train run as a state dict (``model``,
    ``optimizer``, counters), or None on a fresh start (see :func:`choose`)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    return None if ckpt is None else choose(Path(ckpt.path), rank)


def choose(registered: Path, rank: int) -> dict[str, Any]:
    """The state of the newest checkpoint beside ``registered`` (Ray Train's latest) that
    verifies whole, for ``rank``.

    Ray Train registers a reported checkpoint when its controller next polls the workers (every
    few seconds): a worker killed in between leaves a newer checkpoint, whole in storage, that
    get_checkpoint() does not know, and resuming from the registered one would redo a second
    checkpoint interval. Checkpoints verify themselves (SHA-256s in config.json, bitlm.checkpoint),
    so a newer one is taken when it is whole and data-parallel (a pipeline's per-stage optimizer
    files carry no checksum: there only registered checkpoints count). Else the registered one;
    one refused as corrupt or incomplete (a crash mid-write, a full disk, a changed file) is
    reported by name and the one before it is tried, down to the first."""
    refused: list[str] = []
    siblings = sorted((p for p in registered.parent.glob("checkpoint_*") if p.is_dir()), reverse=True)
    for d in (p for p in siblings if p.name > registered.name):
        try:
            state = _read(d, rank)
            if "step" not in state or "training_state.pt" not in read_config(d).get("sha256", {}):
                raise CheckpointError("it has no checksummed training state")
            if state.get("strategy") == "pipeline":
                raise CheckpointError("a pipeline checkpoint counts only once Ray Train registered it")
        except CheckpointError as e:
            refused.append(f"{d}: {e}")
            continue
        print(f"resuming from {d}, newer than Ray Train's latest registered checkpoint ({registered.name})", flush=True)
        return state
    for d in [registered, *(p for p in siblings if p.name < registered.name)]:
        try:
            state = _read(d, rank)
        except CheckpointError as e:
            refused.append(f"{d}: {e}")
            continue
        if d != registered:
            print(f"resuming from {d}, the latest good checkpoint; refused: " + "; ".join(refused), flush=True)
        return state
    raise CheckpointError("no loadable checkpoint to resume from: " + "; ".join(refused))


def _read(d: Path, rank: int) -> dict[str, Any]:
    """Everything on the CPU, whatever the worker's device: the model is built there, may be
    grown there (pipelines/worker.py), then moves to the device once; loading the weights onto
    a GPU first would copy them back into the CPU-built model. The optimizer's load places its
    state on its parameters' devices (Optimizer.load_state_dict)."""
    state = load_training_state(d) or {}
    state["model"] = load_pretrained(d, map_location="cpu")
    rank_file = d / f"optimizer_rank{rank}.pt"
    if rank_file.exists():
        state["optimizer"] = torch.load(rank_file, map_location="cpu", weights_only=True)
    return state


def full_model_state(w) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (a collective under fsdp and pipeline)."""
    if w.sharded:
        from bitlm.distributed import full_state_dict

        return full_state_dict(w.model)
    if w.pipeline is not None:
        return w.pipeline.full_state_dict()
    return {k: v.detach().cpu() for k, v in w.base.state_dict().items()}


def _optimizer_state(w) -> dict[str, Any]:
    if w.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(w.model, w.trainer.optimizer, options=options)
    return w.trainer.optimizer.state_dict()


def restore_optimizer(w, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state into the worker's optimizer (any strategy)."""
    if w.growth is not None:
        from bitlm.optim import remap_optimizer_state

        remap_optimizer_state(w.growth["old_names"], state["optimizer"], w.base, w.trainer.optimizer)
    elif w.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(w.model, w.trainer.optimizer, state["optimizer"], options=options)
    else:
        w.trainer.optimizer.load_state_dict(state["optimizer"])


def save(w, metrics: dict[str, float]) -> None:
    """Report ``metrics`` to Ray Train with a checkpoint of the worker (every rank calls it)."""
    import ray.train

    model_state = full_model_state(w)
    optim_state = _optimizer_state(w)
    with tempfile.TemporaryDirectory() as d:
        if w.rank == 0:
            save_pretrained(w.base, d, extra={"mlflow_run_id": w.run_id}, state_dict=model_state)
            state = {
                "step": w.trainer.step,
                "epoch": w.epoch,
                "batch_in_epoch": w.batch_in_epoch,
                "seconds": w.seconds,
                "rng": w.trainer.rng.get_state(),
                "grown_at": w.trainer.grown_at,
                "strategy": w.strategy,
                "world_size": w.world,
            }
            if w.pipeline is None:
                state["optimizer"] = optim_state
            save_training_state(d, state)
        if w.pipeline is not None:  # each stage keeps its own optimizer state
            torch.save(optim_state, Path(d) / f"optimizer_rank{w.rank}.pt")
        write = w.rank == 0 or w.pipeline is not None
        try:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if write else None)
        except OSError as e:
            if e.errno != errno.ENOSPC and "No space left" not in str(e):
                raise
            raise CheckpointError(
                f"the checkpoint of step {w.trainer.step} could not be written to {w.cfg.run.storage_path}: no space "
                "left on the device. The checkpoints written before it are intact: free space (or set "
                "run.storage_path elsewhere) and run again with --resume"
            ) from e
