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

from .bits import rle_bit_stream
from .config import ModelConfig, TrainConfig
from .diffusion import diffusion_levels, diffusion_loss
from .model import BitTransformerLM
from .schedules import compress_probability, diffusion_noise_scale, sequence_length
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


def next_bit_loss(logits: torch.Tensor, bits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-bit cross-entropy in nats over the predicted positions ``mask`` (B, T-1)
    selects (default: all of them)."""
    if mask is None:
        return F.cross_entropy(logits[:, :-1].reshape(-1, 2).float(), bits[:, 1:].reshape(-1))
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 2).float(), bits[:, 1:].reshape(-1), reduction="none")
    mask = mask.reshape(-1).float()
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def compressed_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window replaced by its run-length-compressed form (bitlm.bits.rle_bit_stream),
    cut or zero-padded to the window length, and a (B, T) mask of the real positions."""
    B, T = batch.shape
    out = torch.zeros_like(batch)
    mask = torch.zeros(B, T, dtype=torch.bool, device=batch.device)
    for i, row in enumerate(batch.cpu().numpy()):  # one call per window; vectorized within it
        stream = torch.from_numpy(rle_bit_stream(row)[:T]).to(batch.device)
        out[i, : stream.numel()] = stream
        mask[i, : stream.numel()] = True
    return out, mask


def data_bit_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T,) True at data-bit positions (phase 0..7) of a byte-aligned window."""
    return torch.arange(T, device=device) % 9 < 8


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


def optimizer_param_names(model: nn.Module) -> list[str]:
    """Parameter names in the order configure_optimizer puts them in its state dict."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [n for n, p in named if p.dim() >= 2 and id(p) not in embeddings]
    return decay + [n for n, p in named if not (p.dim() >= 2 and id(p) not in embeddings)]


def remap_optimizer_state(
    old_names: list[str], old_state: dict, new_model: nn.Module, optimizer: torch.optim.Optimizer
) -> int:
    """Load the state of an optimizer built by configure_optimizer for a model with parameter
    names ``old_names`` into ``optimizer`` (built the same way for ``new_model``), for every
    parameter whose name and shape are unchanged; others start fresh. Returns how many were
    carried over."""
    new_names = optimizer_param_names(new_model)
    params = dict(new_model.named_parameters())
    old_index = {name: i for i, name in enumerate(old_names)}
    carried = 0
    for name in new_names:
        entry = old_state["state"].get(old_index.get(name, -1))
        if entry is not None and entry["exp_avg"].shape == params[name].shape:
            optimizer.state[params[name]] = {k: v.clone() if torch.is_tensor(v) else v for k, v in entry.items()}
            carried += 1
    return carried


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

    The objective of each micro-batch is drawn from the config, with the trainer's own seeded
    generator (its state is part of ``state_dict``):

    - next-bit prediction on the window, the default;
    - with probability ``compress_probability(step, compress_prob, compress_warmup)``, the
      window's *compressed form*: its run-length pairs written as 9-bit groups (the run's bit,
      then its length in 8 bits; bitlm.bits.rle_bit_stream), cut to the window length. The
      model reads that stream and predicts its next bit, so it learns the statistics of runs
      rather than of bytes; padding past a short stream carries no loss;
    - with probability ``direct_prob``, *direct bit prediction*: the loss is taken on the
      data bits only, the parity positions carry none. That is exactly what generation samples
      (the codec sets parity), with no capacity spent on the parity bit;
    - with ``diffusion``, the denoising objective of bitlm.diffusion instead of next-bit
      prediction (compression and direct apply to it the same way), with noise levels drawn
      from ``noise_schedule`` and, with ``diffusion_curriculum``, scaled down over training.

    With ``seq_ramp_start_bytes`` and ``seq_ramp_steps`` the windows are cut to
    ``sequence_length(step, ...)`` bits first (short windows early, the full context later).
    bpb and parity bpb are reported for plain next-bit batches only.
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
        self.grown_at: int | None = None  # the step the model last grew (lr_at re-warms after it)
        self.rng = torch.Generator().manual_seed(cfg.seed)
        self.forward = model
        if cfg.compile_model:
            self.forward = _compile(model)

    def _draw(self, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=self.rng)) < p

    def _loss(self, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, B, T = self.cfg, batch.size(0), batch.size(1)
        mask = None
        compress_p = compress_probability(self.step, cfg.compress_prob, cfg.compress_warmup)
        compressed = self._draw(compress_p)
        if compressed:
            batch, mask = compressed_batch(batch)
        direct = self._draw(cfg.direct_prob)
        stats: dict[str, Any] = {"compressed": float(compressed), "direct": float(direct), "compress_p": compress_p}
        if cfg.diffusion:
            if direct:
                data = data_bit_mask(T, batch.device).expand(B, T)
                mask = data if mask is None else mask & data
            scale = diffusion_noise_scale(self.step, self.total_steps) if cfg.diffusion_curriculum else 1.0
            levels = diffusion_levels(B, cfg.noise_schedule, scale, self.rng)
            loss, telemetry = diffusion_loss(self.forward, batch, levels, self.rng, mask)
            stats["noise_scale"] = scale
        else:
            if mask is not None:
                mask = mask[:, 1:]
            if direct:
                data = data_bit_mask(T, batch.device)[1:].expand(B, T - 1)
                mask = data if mask is None else mask & data
            logits, telemetry = self.forward(batch)
            loss = next_bit_loss(logits, batch, mask)
            if mask is None:
                stats.update(bits_per_byte(logits.detach(), batch))
        stats["loss"] = loss.item()
        stats.update(telemetry_summary(telemetry))
        return loss + telemetry_penalty(self.model, telemetry), stats

    def _cut(self, batch: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.seq_ramp_start_bytes is None or not cfg.seq_ramp_steps:
            return batch
        return batch[:, : sequence_length(self.step, batch.size(1), 9 * cfg.seq_ramp_start_bytes, cfg.seq_ramp_steps)]

    def train_step(self, micro_batches: Sequence[torch.Tensor], progress: float | None = None) -> dict[str, Any]:
        self.model.train()
        lr = self.set_lr(progress)
        device = next(self.model.parameters()).device
        records = []
        n_bits = 0
        for batch in micro_batches:
            batch = self._cut(batch.to(device))
            n_bits += batch.numel()
            with _autocast(self.cfg.amp, device):
                loss, stats = self._loss(batch)
            (loss / len(micro_batches)).backward()
            records.append(stats)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        keys = {k for r in records for k in r}
        record = {k: sum(r[k] for r in records if k in r) / sum(k in r for r in records) for k in keys}
        return {"step": self.step, "lr": lr, "bits": n_bits, "seq_bits": batch.size(1), **record}

    def set_lr(self, progress: float | None = None) -> float:
        """Set the optimizer's learning rate for the coming step (lr_at) and return it."""
        lr = lr_at(self.step, self.cfg, self.total_steps, progress, self.grown_at)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    @torch.no_grad()
    def evaluate(
        self, data: torch.Tensor, batch_size: int | None = None, max_batches: int | None = None
    ) -> dict[str, float]:
        return evaluate(self.model, data, batch_size or self.cfg.batch_size, max_batches, self.cfg.amp)

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
    (``lr``, ``max_steps``, ``max_seconds``, ``eval_every``, ``compress_prob``,
    ``diffusion``, ...; see :class:`Trainer` for the objectives). ``val_data`` is evaluated
    every ``eval_every`` steps and at the end. ``callback(record)`` sees each step's record and
    may return True to stop.

    Progressive scaling: with ``scale_patience`` set, an evaluation whose validation loss is
    not ``scale_min_delta`` below the best so far counts as a plateau; after ``scale_patience``
    of them in a row the model grows by the next strategy of ``scale_strategies`` (cycling),
    unless that would exceed ``scale_max_params``. Each growth is function-preserving
    (bitlm.scale.expand_model), keeps the optimizer state of unchanged parameters, and is
    recorded in ``history.expansions``; ``history.model`` is the final model. Without
    ``val_data`` the plateau is judged on the mean training loss between evaluations.
    """
    from .scale import expand_model, expand_optimizer

    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"train_loop got unknown argument(s) {unknown}; see TrainConfig for valid ones")
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, accum_steps=accum_steps, amp=amp, compile_model=compile_model, **kwargs
    )
    windows = _as_windows(data)
    val = _as_windows(val_data) if val_data is not None else None
    steps_per_epoch = max(1, len(windows) // (cfg.batch_size * cfg.accum_steps))
    total = cfg.max_steps or steps_per_epoch * cfg.epochs
    trainer = Trainer(model, cfg, optimizer, total_steps=total)
    history = TrainHistory(model=model)
    generator = torch.Generator().manual_seed(cfg.seed)
    start = time.perf_counter()
    plateau = {"best": math.inf, "bad": 0, "next": 0, "losses": []}
    eval_every = cfg.eval_every or (steps_per_epoch if cfg.scale_patience else 0)

    def out_of_budget() -> bool:
        if cfg.max_steps is not None and trainer.step >= cfg.max_steps:
            return True
        return cfg.max_seconds is not None and time.perf_counter() - start >= cfg.max_seconds

    def run_eval(epoch: int, final: bool = False) -> None:
        record = {"step": trainer.step, "epoch": epoch, "seconds": time.perf_counter() - start}
        if val is not None:
            record.update(trainer.evaluate(val, max_batches=cfg.eval_batches))
            score = record["val_loss"]
        else:
            score = sum(plateau["losses"]) / max(1, len(plateau["losses"]))
            record["train_loss"] = score
        plateau["losses"] = []
        history.evals.append(record)
        if log and "val_bpb" in record:
            print(f"eval step {trainer.step}: val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.3f}")
        if cfg.scale_patience is not None and not final:  # a growth at the end trains nothing
            maybe_grow(score, epoch)

    def maybe_grow(score: float, epoch: int) -> None:
        nonlocal trainer
        if score < plateau["best"] - cfg.scale_min_delta:
            plateau["best"], plateau["bad"] = score, 0
            return
        plateau["bad"] += 1
        if plateau["bad"] < cfg.scale_patience or not cfg.scale_strategies:
            return
        strategy = cfg.scale_strategies[plateau["next"] % len(cfg.scale_strategies)]
        old_model = trainer.model
        grown = expand_model(old_model, strategy, generator=generator)
        if cfg.scale_max_params is not None and grown.num_parameters() > cfg.scale_max_params:
            return
        grown.train(old_model.training)
        opt = expand_optimizer(trainer.optimizer, old_model, grown)
        step, rng = trainer.step, trainer.rng.get_state()
        trainer = Trainer(grown, cfg, opt, total_steps=total)
        trainer.step = trainer.grown_at = step
        trainer.rng.set_state(rng)
        event = {
            "step": step,
            "epoch": epoch,
            "strategy": strategy,
            "params_before": old_model.num_parameters(),
            "params_after": grown.num_parameters(),
        }
        if val is not None:
            event["val_loss_before"] = history.evals[-1]["val_loss"]
            event["val_loss_after"] = trainer.evaluate(val, max_batches=cfg.eval_batches)["val_loss"]
        history.expansions.append(event)
        history.model = grown
        plateau.update(bad=0, next=plateau["next"] + 1, best=math.inf)
        if log:
            print(
                f"expanded model by {strategy} at step {step}: {event['params_before']:,} -> {event['params_after']:,} parameters"
            )

    stop = False
    epoch = 0
    per_step = cfg.batch_size * cfg.accum_steps
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(windows), generator=generator)
        for i in range(0, max(1, len(order) - per_step + 1), per_step):
            idx = order[i : i + per_step]
            micro = [windows[idx[j : j + cfg.batch_size]] for j in range(0, len(idx), cfg.batch_size)]
            progress = None
            if cfg.max_seconds and not cfg.max_steps:
                progress = (time.perf_counter() - start) / cfg.max_seconds
            record = trainer.train_step(micro, progress)
            record.update(epoch=epoch, seconds=time.perf_counter() - start, params=trainer.model.num_parameters())
            plateau["losses"].append(record["loss"])
            if log and (trainer.step % cfg.log_every == 0 or trainer.step == 1):
                extra = f" bpb {record['bpb']:.3f}" if "bpb" in record else ""
                print(
                    f"step {trainer.step} epoch {epoch}: loss {record['loss']:.4f}{extra} "
                    f"K {record['K']:.3f} C {record['C']:.3f} S {record['S']:.3f} lr {record['lr']:.2e}"
                )
            history.steps.append(record)
            if callback is not None and callback(record):
                stop = True
            if eval_every and trainer.step % eval_every == 0:
                run_eval(epoch)
            if stop or out_of_budget():
                stop = True
                break
        if stop:
            break
    if val is not None and (not history.evals or history.evals[-1]["step"] != trainer.step):
        run_eval(epoch, final=True)
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
