"""Training: the next-bit objective, bits-per-byte, the optimizer, and ``train_loop``.

The pieces are small so that every trainer uses the same ones: ``train_loop`` here, and the
Ray Train workers in ``pipelines/`` (which bring their own data loading, distribution and
checkpointing) both drive a :class:`Trainer`.

Bits per byte (bpb) is the quality number the whole project reports. For next-bit logits
(B, T, 2) over windows that start on a byte boundary, the bit at position p (p >= 1) has
phase p mod 9; phases 0..7 are data bits and phase 8 is the parity bit::

    nll_p = -log2 softmax(logits[:, p - 1])[bits[:, p]]
    bpb        = sum over data positions of nll_p / (number of data positions / 8)
    parity_bpb = sum over parity positions of nll_p / number of parity positions

The parity bit's cost is reported apart and never mixed into bpb.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig, TrainConfig
from .model import BitTransformerLM
from .telemetry import telemetry_summary

LN2 = math.log(2)


def unwrap(model: nn.Module) -> nn.Module:
    """The BitTransformerLM inside DDP / compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


# -- objective and metrics -------------------------------------------------------------------


def bit_nll(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """-log2 p of each next bit: (B, T-1), entry t is bit t+1 given bits <= t."""
    B, T, _ = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 2).float(), bits[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, T - 1) / LN2


def bits_per_byte(logits: torch.Tensor, bits: torch.Tensor) -> dict[str, float]:
    """``{"bpb", "parity_bpb"}`` of byte-aligned windows (see the module docstring)."""
    nll = bit_nll(logits, bits)
    phase = torch.arange(1, bits.size(1), device=bits.device) % 9
    data, parity = nll[:, phase < 8], nll[:, phase == 8]
    out = {"bpb": float(data.sum() / (data.numel() / 8))}
    out["parity_bpb"] = float(parity.mean()) if parity.numel() else 0.0
    return out


def next_bit_loss(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Mean next-bit cross-entropy in nats over every predicted position."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, 2).float(), bits[:, 1:].reshape(-1))


def telemetry_penalty(model: nn.Module, telemetry: dict[str, Any]) -> torch.Tensor | float:
    """lambda_K (1 - K) + lambda_C (1 - C) + lambda_S (1 - S): the guide's regularizers."""
    cfg = unwrap(model).config
    penalty: torch.Tensor | float = 0.0
    for lam, key in (
        (cfg.lambda_K, "negentropy_logits"),
        (cfg.lambda_C, "lz_complexity_logits"),
        (cfg.lambda_S, "symbiosis_score"),
    ):
        if lam > 0:
            penalty = penalty + lam * (1 - telemetry[key])
    return penalty


# -- optimizer and schedule ------------------------------------------------------------------


def configure_optimizer(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.95),
) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: never on norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def lr_at(step: int, cfg: TrainConfig, total_steps: int | None, progress: float | None = None) -> float:
    """Learning rate at optimizer step ``step``: linear warm-up, then constant or cosine
    decay from ``lr`` to ``min_lr`` over ``total_steps``. A time-budgeted run passes
    ``progress`` (elapsed / budget) instead, so the decay ends when the budget does."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant" or not (total_steps or progress is not None):
        return cfg.lr
    if progress is None:
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, max(0.0, progress))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_dropout(model: nn.Module, p: float) -> None:
    """Set the probability of every dropout layer (and the model config) to ``p``."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if isinstance(m, BitTransformerLM):
            m.config.dropout = p
            for block in m.blocks:
                block.attn.dropout = p


# -- the trainer ----------------------------------------------------------------------------


def _autocast(amp: bool, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


class Trainer:
    """One optimizer step at a time: objective, accumulation, clipping, schedule, telemetry.

    ``train_step(micro_batches)`` runs forward/backward over the micro-batches (gradient
    accumulation) and one optimizer step, and returns the step's record. ``evaluate(data)``
    returns validation loss and bpb. ``state_dict()`` holds what a resume needs.
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        optimizer: torch.optim.Optimizer | None = None,
        total_steps: int | None = None,
    ):
        self.model, self.cfg, self.total_steps = model, cfg, total_steps
        self.optimizer = optimizer or configure_optimizer(model, cfg.lr, cfg.weight_decay)
        self.step = 0
        self.forward = model
        if cfg.compile_model:
            self.forward = _compile(model)

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        logits, telemetry = self.forward(batch)
        loss = next_bit_loss(logits, batch)
        return loss + telemetry_penalty(self.model, telemetry), {
            "loss": loss.item(),
            **bits_per_byte(logits.detach(), batch),
            **telemetry_summary(telemetry),
        }

    def train_step(self, micro_batches: Sequence[torch.Tensor], progress: float | None = None) -> dict[str, Any]:
        self.model.train()
        lr = lr_at(self.step, self.cfg, self.total_steps, progress)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        device = next(self.model.parameters()).device
        records = []
        for batch in micro_batches:
            with _autocast(self.cfg.amp, device):
                loss, stats = self._loss(batch.to(device))
            (loss / len(micro_batches)).backward()
            records.append(stats)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        record = {k: sum(r[k] for r in records) / len(records) for k in records[0]}
        n_bits = sum(b.numel() for b in micro_batches)
        return {"step": self.step, "lr": lr, "bits": n_bits, **record}

    @torch.no_grad()
    def evaluate(
        self, data: torch.Tensor, batch_size: int | None = None, max_batches: int | None = None
    ) -> dict[str, float]:
        return evaluate(self.model, data, batch_size or self.cfg.batch_size, max_batches, self.cfg.amp)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])


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


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: torch.Tensor,
    batch_size: int = 16,
    max_batches: int | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Validation ``{"val_loss", "val_bpb", "val_parity_bpb"}`` over windows (N, T).

    With ``max_batches`` it reads that many batches of windows spread evenly over ``data``
    (the same ones every call), so a partial evaluation still samples the whole split.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = torch.as_tensor(data)
    if max_batches is not None and len(data) > max_batches * batch_size:
        data = data[torch.linspace(0, len(data) - 1, max_batches * batch_size).long()]
    totals = {"loss": 0.0, "bpb": 0.0, "parity_bpb": 0.0}
    n = 0
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size].long().to(device)
        with _autocast(amp, device):
            logits, _ = model(batch)
        w = batch.size(0)
        totals["loss"] += float(next_bit_loss(logits, batch)) * w
        for k, v in bits_per_byte(logits, batch).items():
            totals[k] += v * w
        n += w
    model.train(was_training)
    if n == 0:
        raise ValueError("evaluate() got no validation windows")
    return {f"val_{k}": v / n for k, v in totals.items()}


# -- train_loop -----------------------------------------------------------------------------


@dataclass
class TrainHistory:
    """What ``train_loop`` did: a record per logged step, per evaluation, per expansion, and
    the final model (a new object when progressive scaling grew it)."""

    steps: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    expansions: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.steps[i]


def _as_windows(data: Any) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        windows = data
    elif isinstance(data, (list, tuple)) and data and isinstance(data[0], torch.Tensor):
        windows = torch.stack(list(data))
    else:
        windows = torch.as_tensor(data)
    if windows.dim() != 2:
        raise ValueError(f"training data must be windows of bits (N, T), got shape {tuple(windows.shape)}")
    return windows.long()


def train_loop(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    batch_size: int = 8,
    accum_steps: int = 1,
    amp: bool = False,
    compile_model: bool = False,
    optimizer: torch.optim.Optimizer | None = None,
    log: bool = False,
    val_data: Any = None,
    callback: Callable[[dict[str, Any]], bool | None] | None = None,
    **kwargs: Any,
) -> TrainHistory:
    """Train ``model`` on windows of bits ``data`` (N, T) and return a :class:`TrainHistory`.

    Keyword arguments beyond the guide's are :class:`bitlm.config.TrainConfig` fields
    (``lr``, ``max_steps``, ``max_seconds``, ``eval_every``, ...). ``val_data`` is evaluated
    every ``eval_every`` steps and at the end. ``callback(record)`` sees each logged step and
    may return True to stop.
    """
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"train_loop got unknown argument(s) {unknown}; see TrainConfig for valid ones")
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        accum_steps=accum_steps,
        amp=amp,
        compile_model=compile_model,
        **kwargs,
    )
    windows = _as_windows(data)
    val = _as_windows(val_data) if val_data is not None else None
    steps_per_epoch = max(1, len(windows) // (cfg.batch_size * cfg.accum_steps))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    trainer = Trainer(model, cfg, optimizer, total_steps=total)
    history = TrainHistory(model=model)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()

    def out_of_budget() -> bool:
        if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
            return True
        return cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds

    def run_eval(epoch: int) -> None:
        if val is None:
            return
        record = {"step": trainer.step, "epoch": epoch, "seconds": time.perf_counter() - start}
        record.update(trainer.evaluate(val, max_batches=cfg.eval_batches))
        history.evals.append(record)
        if log:
            print(f"eval step {trainer.step}: val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.3f}")

    stop = False
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(windows), generator=generator)
        per_step = cfg.batch_size * cfg.accum_steps
        for i in range(0, len(order) - per_step + 1 if len(order) >= per_step else 1, per_step):
            idx = order[i : i + per_step]
            micro = [windows[idx[j : j + cfg.batch_size]] for j in range(0, len(idx), cfg.batch_size)]
            progress = None
            if cfg.max_seconds and not cfg.max_steps:
                progress = (time.perf_counter() - start) / cfg.max_seconds
            record = trainer.train_step(micro, progress)
            record.update(epoch=epoch, seconds=time.perf_counter() - start)
            if log and (trainer.step % cfg.log_every == 0 or trainer.step == 1):
                print(
                    f"step {trainer.step} epoch {epoch}: loss {record['loss']:.4f} bpb {record['bpb']:.3f} "
                    f"K {record['K']:.3f} C {record['C']:.3f} S {record['S']:.3f} lr {record['lr']:.2e}"
                )
            history.steps.append(record)
            if callback is not None and callback(record):
                stop = True
            if cfg.eval_every and trainer.step % cfg.eval_every == 0:
                run_eval(epoch)
            if stop or out_of_budget():
                stop = True
                break
        if stop:
            break
    if val is not None and (not history.evals or history.evals[-1]["step"] != trainer.step):
        run_eval(epoch)
    return history


def example_training_step() -> tuple[float, dict[str, Any]]:
    """The guide's minimal example: one optimizer step of a tiny model on random bits."""
    torch.manual_seed(0)
    model = BitTransformerLM(config=ModelConfig(d_model=32, nhead=4, num_layers=1, dim_feedforward=64, max_seq_len=64))
    bits = torch.randint(0, 2, (4, 63))
    optimizer = configure_optimizer(model, lr=1e-3)
    logits, telemetry = model(bits)
    loss = next_bit_loss(logits, bits)
    loss.backward()
    optimizer.step()
    return loss.item(), telemetry
