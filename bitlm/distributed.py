"""Distributed helpers, applied to a model from outside: DDP, FSDP2 sharding, pipeline stages.

The model class knows nothing of parallelism. ``setup_distributed`` joins a process group
(gloo on CPU, nccl on GPU), ``wrap_fsdp`` shards a model with FSDP2 (``fully_shard``, one unit
per transformer block plus the root), ``make_pipeline`` cuts it into pipeline stages run by
``torch.distributed.pipelining``, and ``parallelize`` applies one of the platform's strategies
(``ddp``, ``fsdp``, ``pipeline``) the way every trainer of the platform does. Sharded
checkpoints go through ``torch.distributed.checkpoint`` and load into an unsharded model in a
single process.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .config import TrainConfig
from .model import apply_dropout, unwrap
from .objectives import BitObjective, Plan
from .telemetry import logit_telemetry

SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD")
STRATEGIES = ("ddp", "fsdp", "pipeline")


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
    replicates them (a 2-D mesh of world x 1: FSDP2's hybrid sharding with shards of one rank,
    i.e. data parallelism with gradients all-reduced). The model is changed in place and
    returned, whatever the strategy, so it trains through ``train_loop`` alike.
    ``mixed_precision`` computes in bf16 and reduces gradients in fp32. ``device_id`` moves
    the model to that CUDA device first (ignored on CPU).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if sharding_strategy not in SHARDING_STRATEGIES:
        raise ValueError(f"sharding_strategy must be one of {SHARDING_STRATEGIES}, got {sharding_strategy!r}")
    if not dist.is_initialized():
        raise RuntimeError("wrap_fsdp needs a process group: call setup_distributed() first")
    if unwrap(model).config.reversible:
        raise ValueError(
            "wrap_fsdp: model.reversible blocks are run branch by branch, past the hooks that gather "
            "sharded parameters; train a reversible model with DDP"
        )
    if device_id is not None and torch.cuda.is_available():
        model = model.to(torch.device("cuda", device_id))
    world = dist.get_world_size()
    if sharding_strategy == "NO_SHARD":
        mesh = init_device_mesh(_device_type(model), (world, 1), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(_device_type(model), (world,))
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
    input bits, which the last stage receives with the targets. ``causal`` is set before each
    step (False for a denoising micro-batch); ``amp`` runs the stage under bf16 autocast.
    """

    def __init__(self, model, start: int, end: int, first: bool, last: bool, use_checkpoint: bool):
        super().__init__()
        self.first, self.last, self.use_checkpoint = first, last, use_checkpoint
        self.causal, self.amp = True, False  # set by PipelineModel.run
        self.io = model.io  # first stage: embeddings; last stage: the output head
        self.pos_emb = model.pos_emb if first else None
        self.drop = model.drop if first else None
        self.blocks = nn.ModuleList(model.blocks[start:end])
        self.ln_f = model.ln_f if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        with torch.autocast(device, dtype=torch.bfloat16, enabled=self.amp):
            if self.first:
                x, _ = self.io.embed(x, None, self.causal)
                x = apply_dropout(self.drop, x + self.pos_emb(torch.arange(x.size(1), device=x.device)))
            for block in self.blocks:
                if self.use_checkpoint and self.training:
                    x = checkpoint(_run_block, block, x, self.causal, use_reentrant=False)
                else:
                    x = block(x, causal=self.causal)[0]
            return self.ln_f(x) if self.last else x


def _run_block(block: nn.Module, x: torch.Tensor, causal: bool) -> torch.Tensor:
    return block(x, causal=causal)[0]


class PipelineModel:
    """This rank's stage of a pipelined BitTransformerLM and the GPipe schedule that runs it.

    ``run(objective, plan, scale)`` runs forward and backward of one micro-batch's plan
    (bitlm.objectives.Plan; every rank must pass the same one) over ``n_microbatches``
    pipeline micro-batches; the last stage scores the output with ``objective.loss`` and the
    step's stats are returned on every rank. Gradients accumulate across calls, scaled by
    ``scale``, so a Trainer accumulates micro-batches as it does for one process.
    ``train_step(bits)`` is the guide's form: the batch rank 0 holds, the plain next-bit
    objective, one call; it returns the mean loss. Step the optimizer over ``parameters()``
    (after ``sync_tied_gradients()`` when gradients come from ``run``).
    """

    def __init__(self, stage: _Stage, schedule, rank: int, world_size: int, base, first_block: int = 0):
        self.stage, self.schedule, self.rank, self.world_size = stage, schedule, rank, world_size
        self.first_block, self.base = first_block, base  # base: the whole (unsplit) model
        self.config, self.group = base.config, dist.group.WORLD
        self.micro_stats: list[dict] = []
        self.last_stats: dict[str, float] = {}
        self.current: tuple | None = None  # (objective, plan, scale) of the running step
        self._plain: BitObjective | None = None

    def parameters(self):
        return self.stage.parameters()

    def sync_tied_gradients(self) -> None:
        """Sum the gradients of the parameters both the first stage (input) and the last
        (output) train (``io.tied_parameter_names``) over the stages, so every copy takes the
        same update: the tie Megatron-style pipelines keep for tied embeddings. Collective."""
        for name in sorted(self.stage.io.tied_parameter_names()):
            p = self.stage.io.get_parameter(name)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, group=self.group)
            p.grad = grad

    def norm_parameters(self) -> list[nn.Parameter]:
        """The parameters whose gradients this stage counts in the global norm: a tied
        parameter's (summed, the same on every stage) on the first stage only."""
        tied = {id(self.stage.io.get_parameter(n)) for n in self.stage.io.tied_parameter_names()}
        return [p for p in self.stage.parameters() if self.rank == 0 or id(p) not in tied]

    def named_parameters(self):
        return self.stage.named_parameters()

    def run(self, objective, plan: Plan, scale: float = 1.0, amp: bool = False) -> dict:
        self.stage.train()
        on_cpu = next(self.stage.parameters()).device.type == "cpu"  # use_autocast is CPU bf16 only
        self.stage.causal, self.stage.amp = plan.causal, amp or (self.config.use_autocast and on_cpu)
        self.current = (objective, plan, scale)
        mask = plan.mask if plan.mask is not None else torch.ones_like(plan.targets, dtype=torch.bool)
        packed = torch.stack([plan.inputs, plan.targets, mask.long()], 1)  # (B, 3, T): what the loss needs
        self.micro_stats = []
        if self.rank == 0 and self.world_size == 1:
            self.schedule.step(plan.inputs, target=packed)
        elif self.rank == 0:
            self.schedule.step(plan.inputs)
        elif self.rank == self.world_size - 1:
            self.schedule.step(target=packed)
        else:
            self.schedule.step()
        # The first step's shape inference also calls the loss on placeholder outputs: keep
        # the real micro-batches only.
        real = self.micro_stats[-self.schedule._n_microbatches :]
        stats = [{k: sum(r[k] for r in real) / len(real) for k in real[0]} if real else None]
        dist.broadcast_object_list(stats, src=self.world_size - 1)
        self.last_stats = stats[0]
        return self.last_stats

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's state dict on CPU, on every rank (a collective). Every stage holds
        the io module: its input side is taken from the first stage, its output side from the
        last, where each trains."""
        parts: list[Any] = [None] * self.world_size
        local = {}
        for name, t in self.stage.state_dict().items():
            if name.startswith("blocks."):
                i, rest = name.split(".", 2)[1:]
                name = f"blocks.{int(i) + self.first_block}.{rest}"
            local[name] = t.detach().cpu()
        dist.all_gather_object(parts, local)
        inputs = {f"io.{n}" for n in self.stage.io.embed_parameter_names()} | {"pos_emb.weight"}
        merged: dict[str, torch.Tensor] = {}
        for rank, part in enumerate(parts):
            for k, v in part.items():
                if k not in inputs or rank == 0:  # later stages win for the output side
                    merged[k] = v
        return merged

    def train_step(self, bits: torch.Tensor | None) -> float:
        """Forward and backward of one batch; the gradients it leaves are a whole step's (tied
        ones summed over the stages): step the optimizer, and zero them, before the next."""
        bits = _broadcast_batch(bits, self.rank, next(self.stage.parameters()).device)
        if self._plain is None:
            self._plain = BitObjective(TrainConfig(), self.config)
        loss = self.run(self._plain, Plan(bits, bits, None, True))["loss"]
        self.sync_tied_gradients()
        return loss


def _broadcast_batch(bits: torch.Tensor | None, rank: int, device: torch.device) -> torch.Tensor:
    shape = torch.tensor(list(bits.shape) if rank == 0 else [0, 0], device=device)
    dist.broadcast(shape, src=0)
    bits = torch.empty(tuple(shape.tolist()), dtype=torch.long, device=device) if rank != 0 else bits
    bits = bits.long().to(device).contiguous()
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
    the last). ``n_microbatches`` defaults to the number of stages. Reversible blocks couple
    two streams between blocks and stages pass one: a reversible model is refused.
    """
    from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

    model = unwrap(model)
    if not dist.is_initialized():
        raise RuntimeError("make_pipeline needs a process group: call setup_distributed() first")
    if model.config.reversible:
        raise ValueError("make_pipeline: model.reversible blocks pass two streams; pipeline stages pass one")
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
    n_micro = n_microbatches or world
    config = model.config
    grad = (config.lambda_K > 0, config.lambda_C > 0, config.lambda_S > 0)

    def loss_fn(h: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        objective, plan, scale = pipeline.current
        inputs, targets, mask = packed[:, 0], packed[:, 1], packed[:, 2].bool()
        with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=stage_module.amp):
            logits = stage_module.io.logits(h, inputs, None, plan.causal).float()
        telemetry = logit_telemetry(logits, inputs, 0, plan.causal, grad, model.reference) if plan.telemetry else {}
        micro = Plan(inputs, targets, mask if plan.mask is not None else None, plan.causal, plan.stats, plan.telemetry)
        loss, stats = objective.loss(logits, telemetry, micro)
        pipeline.micro_stats.append(stats)
        return loss * (scale / n_micro)  # the schedule sums micro-batch gradients (scale_grads=False)

    schedule = ScheduleGPipe(stage, n_micro, loss_fn=loss_fn, scale_grads=False)
    pipeline = PipelineModel(stage_module, schedule, rank, world, model, start)
    return pipeline


def balance_layers(num_layers: int, world: int) -> list[int]:
    """Blocks per pipeline stage: as even as it gets, the first stages taking the remainder."""
    if num_layers < world:
        raise ValueError(f"the pipeline strategy needs at least one block per rank: {num_layers} layers, {world} ranks")
    return [num_layers // world + (1 if i < num_layers % world else 0) for i in range(world)]


def parallelize(model: nn.Module, strategy: str) -> tuple[nn.Module, PipelineModel | None]:
    """Apply a platform strategy to ``model`` over the default process group and return (the
    module a Trainer steps, the pipeline or None); pass both to ``bitlm.Trainer``:

    - ``ddp``: DistributedDataParallel (small buckets: gradients all-reduce while backward runs);
    - ``fsdp``: FSDP2 ``FULL_SHARD`` in place. ``amp`` is the Trainer's bf16 autocast, as under
      the other strategies (FSDP's own bf16 parameters would compute something else);
    - ``pipeline``: one stage per rank (``balance_layers``), activations recomputed when the
      model uses checkpointing. Every rank must then feed the same micro-batches
      (``gather_batch``).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ddp":
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, ids, bucket_cap_mb=1, gradient_as_bucket_view=True), None
    if strategy == "fsdp":
        return wrap_fsdp(model, "FULL_SHARD"), None
    base = unwrap(model)
    balance = balance_layers(base.config.num_layers, dist.get_world_size())
    pipeline = make_pipeline(base, balance, checkpoint="always" if base.config.use_checkpoint else "never")
    return pipeline.stage, pipeline


def group_device(group: Any = None) -> torch.device:
    """The device a collective of ``group`` (default: the whole world) runs on: this rank's
    CUDA device under nccl, which takes CUDA tensors only; the CPU under gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_batch(bits: torch.Tensor) -> torch.Tensor:
    """Every rank's batch (B, T) concatenated in rank order (a collective; the pipeline's input,
    so the data of every rank trains), on the process group's device (``group_device``)."""
    bits = bits.to(group_device()).contiguous()
    parts = [torch.empty_like(bits) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, bits)
    return torch.cat(parts)
