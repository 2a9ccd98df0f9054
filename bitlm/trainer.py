"""One optimizer step: the learning-rate schedule, gradient accumulation, autocast, compile,
gradient clipping and the update, in one place for every trainer.

``Trainer.train_step(micro_batches)`` runs the objective (bitlm.objectives) forward and backward
over each micro-batch, clips the gradients by their global norm, steps the optimizer and returns
the step's record. The model it steps may be plain, DistributedDataParallel, FSDP2-sharded, or
one stage of a pipeline (``pipeline=``, bitlm.distributed.make_pipeline); the step is the same,
only the forward/backward of a micro-batch and the reach of the gradient norm differ:

- DDP and FSDP2 synchronize gradients on the last micro-batch only (``no_sync`` /
  ``set_requires_gradient_sync``): accumulation costs one all-reduce per step, not per micro-batch;
- a pipeline stage holds a disjoint part of the parameters, so the squared gradient norms of all
  stages are summed before clipping, as the unsplit model would clip.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import TrainConfig
from .model import unwrap
from .objectives import BitObjective
from .optim import configure_optimizer
from .reference import count_bytes


def lr_at(
    step: int,
    cfg: TrainConfig,
    total_steps: int | None,
    progress: float | None = None,
    grown_at: int | None = None,
) -> float:
    """Learning rate at optimizer step ``step``: linear warm-up, then constant or cosine
    decay from ``lr`` to ``min_lr`` over ``total_steps``. A time-budgeted run passes
    ``progress`` (elapsed / budget) instead, so the decay ends when the budget does.

    ``grown_at``: the step the model last grew. The rate then ramps up again over
    ``growth_warmup_steps``: widened parameters start with fresh Adam moments, whose first
    updates are about ``lr`` per weight whatever the gradient, and at full rate they undo much
    of what the grown model knew (measured: 4.79 -> 6.09 val bpb four steps after a width
    growth of the tiny config at lr 5e-3; 4.80 -> 4.95 with an 8-step ramp)."""
    if grown_at is not None and cfg.growth_warmup_steps and step - grown_at < cfg.growth_warmup_steps:
        return lr_at(step, cfg, total_steps, progress) * (step - grown_at + 1) / cfg.growth_warmup_steps
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or not (total_steps or progress is not None):
        return cfg.lr
    if progress is None:
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def clip_gradients(
    parameters: Sequence[nn.Parameter],
    max_norm: float,
    group: Any = None,
    device: torch.device | None = None,
    measured: Sequence[nn.Parameter] | None = None,
) -> float:
    """Scale the gradients so that their global L2 norm is at most ``max_norm`` (0: only
    measure it); return the norm before clipping. FSDP2's sharded gradients are measured whole.
    With ``group`` (the pipeline's process group) the parameters are one stage's part of the
    model: the squared norms of all stages are summed, each over its ``measured`` parameters
    (default: all; a tied parameter is measured on one stage)."""
    grads = [p.grad for p in (parameters if measured is None else measured) if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
    if hasattr(norm, "full_tensor"):  # a DTensor: the norm over every shard
        norm = norm.full_tensor()
    if group is not None:
        sq = norm.float().pow(2)
        dist.all_reduce(sq, group=group)
        norm = sq.sqrt()
    if max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return float(norm)


def _data_parallel(model: nn.Module) -> bool:
    """A DDP module or an FSDP2-sharded one: its ranks train on different data."""
    return isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "set_requires_gradient_sync")


@contextlib.contextmanager
def _grad_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce of DDP / FSDP2 on micro-batches that are not the last."""
    if sync:
        yield
    elif isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def _compile(model: nn.Module) -> Callable:
    """torch.compile(model), falling back to eager with a warning where compile fails."""
    try:
        compiled = torch.compile(model)
    except Exception as e:  # noqa: BLE001 - any backend failure means "run eagerly"
        warnings.warn(f"torch.compile unavailable ({e}); training eagerly", stacklevel=3)
        return model
    state = {"fn": compiled}

    def forward(*args, **kwargs):
        try:
            return state["fn"](*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if state["fn"] is model:
                raise
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {e}); training eagerly", stacklevel=2)
            state["fn"] = model
            return model(*args, **kwargs)

    return forward


class Trainer:
    """One optimizer step at a time (see the module docstring).

    ``objective`` defaults to the bit objective of ``model``'s config (bitlm.objectives); any
    callable ``objective(forward, batch, step) -> (loss, stats)`` trains instead (the byte-level
    GPT of the benchmarks). The trainer's seeded generator draws the objectives, and it is part
    of ``state_dict``, so a resumed run continues its draws. It is a CPU generator whatever the
    model's device: it draws host-side decisions (which objective, which noise level, the seed
    of the batch's noise, which is then drawn on the batch's device), so a run draws the same
    on any device and its saved state restores on any other. ``grown_at`` is the step the model
    last grew (the learning rate re-warms after it, see ``lr_at``). Without an ``optimizer`` it
    builds ``configure_optimizer``'s AdamW, fused with ``cfg.fused_adamw``.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer | None = None,
        total_steps: int | None = None,
        objective: Callable | None = None,
        pipeline: Any = None,
        rank: int = 0,
    ):
        self.model, self.cfg, self.total_steps, self.pipeline = model, cfg, total_steps, pipeline
        self.module = pipeline.stage if pipeline is not None else model  # what holds the parameters
        if pipeline is not None and cfg.compile_model:
            raise ValueError("train.compile_model is not supported on a pipeline stage")
        self.optimizer = optimizer or configure_optimizer(self.module, cfg.lr, cfg.weight_decay, fused=cfg.fused_adamw)
        self.step = 0
        self._seen: torch.Tensor | None = None  # byte counts of this step's data, see _record_data
        self.grown_at: int | None = None
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.base = pipeline.base if pipeline is not None else unwrap(model)  # the BitTransformerLM
        if objective is None:
            objective = BitObjective(cfg, self.base.config, total_steps, self.rng, rank)
        elif hasattr(objective, "generator"):
            objective.generator = self.rng
        self.objective = objective
        self.forward = _compile(model) if cfg.compile_model else model

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def set_lr(self, progress: float | None = None) -> float:
        """Set the optimizer's learning rate for the coming step (lr_at) and return it."""
        lr = lr_at(self.step, self.cfg, self.total_steps, progress, self.grown_at)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self, micro_batches: Sequence[torch.Tensor], progress: float | None = None) -> dict[str, Any]:
        """Forward and backward over ``micro_batches`` (accumulated), then one update."""
        self.module.train()
        lr = self.set_lr(progress)
        device, n = self.device, len(micro_batches)
        records, n_bits = [], 0
        for i, batch in enumerate(micro_batches):
            batch = batch.to(device, non_blocking=True)
            with _grad_sync(self.model, i == n - 1):
                records.append(self._micro_step(batch, 1.0 / n))
            n_bits += batch.size(0) * records[-1].get("seq_bits", batch.size(1))
        group = measured = None
        if self.pipeline is not None:
            self.pipeline.sync_tied_gradients()
            group, measured = self.pipeline.group, self.pipeline.norm_parameters()
        grad_norm = clip_gradients(list(self.module.parameters()), self.cfg.grad_clip, group, device, measured)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._record_data()
        self.step += 1
        keys = {k for r in records for k in r}
        record = {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}
        return {**record, "step": self.step, "lr": lr, "bits": n_bits, "grad_norm": grad_norm}

    def _micro_step(self, batch: torch.Tensor, scale: float) -> dict[str, Any]:
        amp = torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.cfg.amp)
        if not isinstance(self.objective, BitObjective):
            with amp:
                loss, stats = self.objective(self.forward, batch, self.step)
            (loss * scale).backward()
            return stats
        # What the model carries from its training: the reference its S judges text against
        # (the clean data; added after the step, see _record_data) and the modes it learned.
        seen = count_bytes(batch)
        self._seen = seen if self._seen is None else self._seen + seen
        plan = self.objective.plan(batch, self.step)
        self.base.trained_modes.add("causal" if plan.causal else "denoise")
        if self.pipeline is not None:
            return self.pipeline.run(self.objective, plan, scale, self.cfg.amp)
        with amp:
            logits, telemetry = self.forward(plan.inputs, causal=plan.causal, telemetry=plan.telemetry)
            loss, stats = self.objective.loss(logits, telemetry, plan)
        (loss * scale).backward()
        return stats

    def _record_data(self) -> None:
        """Add the step's bytes to the model's reference: every data-parallel rank's (summed,
        exact in float64), so all ranks carry the same reference and judge S alike; a pipeline's
        ranks already saw the same gathered batch. Steps see the data of the steps before them."""
        seen, self._seen = self._seen, None
        if seen is None:
            return
        if self.pipeline is None and _data_parallel(self.model) and dist.get_world_size() > 1:
            dist.all_reduce(seen)
        self.base.reference.add(seen)

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "rng": self.rng.get_state(),
            "grown_at": self.grown_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.grown_at = state.get("grown_at")
        if "rng" in state:
            self.rng.set_state(state["rng"])
