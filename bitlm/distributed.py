"""Distributed helpers, applied to a model from outside: FSDP2 sharding and pipeline stages.

The model class knows nothing of parallelism. ``setup_distributed`` joins a process group
(gloo on CPU, nccl on GPU), ``wrap_fsdp`` shards a model with FSDP2 (``fully_shard``, one unit
per transformer block plus the root), ``make_pipeline`` cuts it into pipeline stages run by
``torch.distributed.pipelining``. Sharded checkpoints go through ``torch.distributed.checkpoint``
and load into an unsharded model in a single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .telemetry import telemetry_summary
from .training import bits_per_byte, next_bit_loss, unwrap

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")


def setup_distributed(
    rank: int | None = None,
    world_size: int | None = None,
    backend: str | None = None,
    master_addr: str | None = None,
    master_port: int | None = None,
) -> torch.device:
    """Join (or reuse) the default process group and return this rank's device.

    Arguments default to the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK); the backend to nccl when CUDA is available, else gloo.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    os.environ["MASTER_ADDR"] = master_addr or os.environ.get("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(master_port or os.environ.get("MASTER_PORT", 29500))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def wrap_fsdp(
    model: nn.Module,
    sharding_strategy: str = "FULL_SHARD",
    mixed_precision: bool = False,
    device_id: int | None = None,
) -> nn.Module:
    """Shard ``model`` over the default process group with FSDP2.

    ``FULL_SHARD`` reshards parameters after each forward (least memory); ``SHARD_GRAD_OP``
    keeps them gathered between forward and backward (less communication); ``NO_SHARD``
    replicates them, which is plain data parallelism (DDP). ``mixed_precision`` computes in
    bf16 and reduces gradients in fp32. ``device_id`` moves the model to that CUDA device
    first (ignored on CPU).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"sharding_strategy must be one of {SHARDING_STRATEGIES}, got {sharding_strategy!r}")
    if not dist.is_initialized():
        raise RuntimeError("wrap_fsdp needs a process group: call setup_distributed() first")
    if device_id is not None and torch.cuda.is_available():
        model = model.to(torch.device("cuda", device_id))
    if sharding_strategy == "NO_SHARD":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    mesh = init_device_mesh(_device_type(model), (dist.get_world_size(),))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if mixed_precision
        else MixedPrecisionPolicy()
    )
    kwargs = {"mesh": mesh, "reshard_after_forward": sharding_strategy == "FULL_SHARD", "mp_policy": mp}
    for block in unwrap(model).blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole, unsharded state dict on CPU at rank 0 (empty elsewhere). Collective: every
    rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_sharded_checkpoint(model: nn.Module, directory: str | os.PathLike) -> None:
    """Each rank writes its own shards (torch.distributed.checkpoint). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    dcp.save(get_model_state_dict(model), checkpoint_id=str(directory))


def load_sharded_checkpoint(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a sharded checkpoint into ``model``: sharded over the current group, or a plain
    model in a single process (the shards are reassembled)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(model)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state)
    return model


# -- pipeline ---------------------------------------------------------------------------------


class _Stage(nn.Module):
    """One pipeline stage: embeddings (first stage), a run of blocks, the final norm (last).

    Stages pass hidden states (B, P, C). The last stage returns normalized hidden states; the
    loss function turns them into logits, because an architecture's output head may need the
    input bits, which the last stage receives as the target.
    """

    def __init__(self, model, start: int, end: int, first: bool, last: bool, use_checkpoint: bool):
        super().__init__()
        self.first, self.last, self.use_checkpoint = first, last, use_checkpoint
        self.io = model.io  # first stage: embeddings; last stage: the output head
        self.pos_emb = model.pos_emb if first else None
        self.drop = model.drop if first else None
        self.blocks = nn.ModuleList(model.blocks[start:end])
        self.ln_f = model.ln_f if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first:
            x, _ = self.io.embed(x, None)
            x = self.drop(x + self.pos_emb(torch.arange(x.size(1), device=x.device)))
        for block in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint(lambda b, h: b(h)[0], block, x, use_reentrant=False)
            else:
                x = block(x)[0]
        return self.ln_f(x) if self.last else x


class PipelineModel:
    """This rank's stage of a pipelined BitTransformerLM and the GPipe schedule that runs it.

    ``train_step(bits)`` runs forward and backward over ``n_microbatches`` micro-batches of the
    batch that rank 0 holds (it is broadcast to the last stage as the target) and returns the
    mean loss on every rank; ``last_stats`` then holds the step's loss, bpb, parity bpb and
    K/C/S (computed on the last stage, broadcast to all). Step the optimizer over
    ``parameters()`` afterwards.
    """

    STATS = ("loss", "bpb", "parity_bpb", "K", "C", "S")

    def __init__(self, stage: _Stage, schedule, rank: int, world_size: int):
        self.stage, self.schedule, self.rank, self.world_size = stage, schedule, rank, world_size
        self.micro_stats: list[list[float]] = []
        self.last_stats: dict[str, float] = {}

    def parameters(self):
        return self.stage.parameters()

    def named_parameters(self):
        return self.stage.named_parameters()

    def train_step(self, bits: torch.Tensor | None) -> float:
        self.stage.train()
        bits = _broadcast_batch(bits, self.rank)
        self.micro_stats = []
        if self.rank == 0 and self.world_size == 1:
            self.schedule.step(bits, target=bits)
        elif self.rank == 0:
            self.schedule.step(bits)
        elif self.rank == self.world_size - 1:
            self.schedule.step(target=bits)
        else:
            self.schedule.step()
        # The first step's shape inference also calls the loss on placeholder outputs: keep
        # the real micro-batches only.
        real = self.micro_stats[-self.schedule._n_microbatches :]
        stats = torch.tensor(real).mean(0) if real else torch.zeros(len(self.STATS))
        dist.broadcast(stats, src=self.world_size - 1)
        self.last_stats = dict(zip(self.STATS, stats.tolist()))
        return self.last_stats["loss"]


def _broadcast_batch(bits: torch.Tensor | None, rank: int) -> torch.Tensor:
    shape = torch.tensor(list(bits.shape) if rank == 0 else [0, 0])
    dist.broadcast(shape, src=0)
    if rank != 0:
        bits = torch.empty(tuple(shape.tolist()), dtype=torch.long)
    bits = bits.long().contiguous()
    dist.broadcast(bits, src=0)
    return bits


def make_pipeline(
    model: nn.Module,
    balance: list[int],
    devices: list[Any] | None = None,
    checkpoint: str = "never",
    n_microbatches: int | None = None,
) -> PipelineModel:
    """Cut ``model`` into ``len(balance)`` stages of ``balance[i]`` blocks, one per rank of the
    default process group, and return this rank's :class:`PipelineModel`.

    ``devices[i]`` places stage i (default: CPU, or this rank's GPU). ``checkpoint`` recomputes
    activations in backward: ``"never"``, ``"always"`` or ``"except_last"`` (every stage but
    the last). ``n_microbatches`` defaults to the number of stages.
    """
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    model = unwrap(model)
    if not dist.is_initialized():
        raise RuntimeError("make_pipeline needs a process group: call setup_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if len(balance) != world:
        raise ValueError(f"balance has {len(balance)} stages but the process group has {world} ranks")
    if sum(balance) != len(model.blocks) or min(balance) < 0:
        raise ValueError(f"balance {balance} must split the model's {len(model.blocks)} blocks")
    if checkpoint not in ("never", "always", "except_last"):
        raise ValueError(f"checkpoint must be 'never', 'always' or 'except_last', got {checkpoint!r}")
    device = torch.device(devices[rank]) if devices else next(model.parameters()).device
    if isinstance(devices[rank] if devices else None, int):
        device = torch.device("cuda", devices[rank]) if torch.cuda.is_available() else torch.device("cpu")
    start = sum(balance[:rank])
    first, last = rank == 0, rank == world - 1
    use_ckpt = checkpoint == "always" or (checkpoint == "except_last" and not last)
    stage_module = _Stage(model, start, start + balance[rank], first, last, use_ckpt).to(device)
    stage = PipelineStage(stage_module, rank, world, device)

    pipeline: PipelineModel

    def loss_fn(h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = stage_module.io.logits(h, target, None)
        loss = next_bit_loss(logits, target)
        with torch.no_grad():
            kcs = telemetry_summary(model._telemetry(logits.detach(), target, [], []))
            bpb = bits_per_byte(logits.detach(), target)
        pipeline.micro_stats.append([loss.item(), bpb["bpb"], bpb["parity_bpb"], kcs["K"], kcs["C"], kcs["S"]])
        return loss

    schedule = ScheduleGPipe(stage, n_microbatches or world, loss_fn=loss_fn)
    pipeline = PipelineModel(stage_module, schedule, rank, world)
    return pipeline
