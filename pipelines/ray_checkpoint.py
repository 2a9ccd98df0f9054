"""Ray Train checkpoints of a training worker: save (a collective) and restore.

A checkpoint is a bitlm checkpoint directory (``config.json`` + ``model.safetensors``, the whole
model gathered on rank 0 under every strategy) plus ``training_state.pt``: the optimizer (whole,
gathered from FSDP shards; per stage in ``optimizer_rank<r>.pt`` under the pipeline strategy),
the step, the data position, the trainer's generator, and the step the model last grew.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from bitlm.checkpoint import CheckpointError, load_training_state, save_training_state
from bitlm.model import load_pretrained, save_pretrained


def load(rank: int) -> dict[str, Any] | None:
    """The latest good checkpoint of this Ray Train run as a state dict (``model``,
    ``optimizer``, counters), or None on a fresh start. A checkpoint refused as corrupt or
    incomplete (bitlm.checkpoint: a crash mid-write, a full disk, a changed file) is reported
    by name and the one before it is tried, down to the first."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    try:
        with ckpt.as_directory() as d:
            return _read(Path(d), rank)
    except CheckpointError as e:
        refused = [f"{ckpt.path}: {e}"]
    here = Path(ckpt.path)
    for older in sorted(
        (p for p in here.parent.glob("checkpoint_*") if p.is_dir() and p.name < here.name), reverse=True
    ):
        try:
            state = _read(older, rank)
        except CheckpointError as e:
            refused.append(f"{older}: {e}")
            continue
        print(f"resuming from {older}, the latest good checkpoint; refused: " + "; ".join(refused), flush=True)
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
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if write else None)
