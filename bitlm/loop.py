"""``train_loop``: the guide's entry point. Epochs of shuffled windows through one
:class:`bitlm.trainer.Trainer`, evaluation, logging, budgets, and progressive scaling.

Progressive scaling: with ``scale_patience`` set, every evaluation's score (the validation
loss, or without ``val_data`` the mean training loss since the last evaluation) goes to a
:class:`bitlm.scale.PlateauRule`; when it calls a plateau, the model grows by the rule's next
strategy (function-preserving, bitlm.scale.expand_model), keeps the optimizer state of unchanged
parameters, and the learning rate re-warms (``growth_warmup_steps``). Each growth is recorded
in ``history.expansions``; ``history.model`` is the final model.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn as nn

from .config import ModelConfig, TrainConfig
from .model import BitTransformerLM, unwrap
from .objectives import evaluate, next_bit_loss
from .optim import configure_optimizer
from .scale import PlateauRule, expand_model, expand_optimizer
from .trainer import Trainer


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


class _Loop:
    """The state of one ``train_loop`` call; ``run()`` trains and returns the history."""

    def __init__(self, model, windows, val, cfg: TrainConfig, optimizer, log: bool, callback):
        self.windows, self.val, self.cfg, self.log, self.callback = windows, val, cfg, log, callback
        self.steps_per_epoch = max(1, len(windows) // (cfg.batch_size * cfg.accum_steps))
        self.total = cfg.max_steps or self.steps_per_epoch * cfg.epochs
        self.trainer = Trainer(model, cfg, optimizer, total_steps=self.total)
        self.history = TrainHistory(model=model)
        # The data order and the growth perturbations: drawn on the CPU, the same on any device.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.start = time.perf_counter()
        self.rule = None
        if cfg.scale_patience is not None:
            if unwrap(model) is not model or hasattr(model, "set_requires_gradient_sync"):
                raise ValueError("train_loop(scale_patience=...) grows a plain model; it got a wrapped one (DDP/FSDP)")
            self.rule = PlateauRule(cfg.scale_patience, cfg.scale_min_delta, cfg.scale_strategies, cfg.scale_max_params)
        self.eval_every = cfg.eval_every or (self.steps_per_epoch if cfg.scale_patience else 0)
        self.losses: list[float] = []  # training losses since the last evaluation

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_budget(self) -> bool:
        cfg = self.cfg
        if cfg.max_steps is not None and self.trainer.step >= cfg.max_steps:
            return True
        return cfg.max_seconds is not None and self.elapsed() >= cfg.max_seconds

    def epoch_order(self) -> torch.Tensor:
        """A shuffled order of the windows, on their device (one copy an epoch, not a batch)."""
        return torch.randperm(len(self.windows), generator=self.generator).to(self.windows.device)

    def micro_batches(self, epoch_order: torch.Tensor):
        per_step = self.cfg.batch_size * self.cfg.accum_steps
        for i in range(0, max(1, len(epoch_order) - per_step + 1), per_step):
            idx = epoch_order[i : i + per_step]
            yield [self.windows[idx[j : j + self.cfg.batch_size]] for j in range(0, len(idx), self.cfg.batch_size)]

    def run(self) -> TrainHistory:
        cfg, epoch = self.cfg, 0
        for epoch in range(cfg.epochs):
            for micro in self.micro_batches(self.epoch_order()):
                progress = self.elapsed() / cfg.max_seconds if cfg.max_seconds and not cfg.max_steps else None
                record = self.trainer.train_step(micro, progress)
                record.update(epoch=epoch, seconds=self.elapsed(), params=unwrap(self.trainer.model).num_parameters())
                self.losses.append(record["loss"])
                self.history.steps.append(record)
                self.print_step(record, epoch)
                stop = self.callback is not None and bool(self.callback(record))
                if self.eval_every and self.trainer.step % self.eval_every == 0:
                    self.evaluate(epoch)
                if stop or self.out_of_budget():
                    return self.finish(epoch)
        return self.finish(epoch)

    def finish(self, epoch: int) -> TrainHistory:
        if self.val is not None and (not self.history.evals or self.history.evals[-1]["step"] != self.trainer.step):
            self.evaluate(epoch, final=True)
        return self.history

    def print_step(self, r: dict[str, Any], epoch: int) -> None:
        if self.log and (self.trainer.step % self.cfg.log_every == 0 or self.trainer.step == 1):
            extra = f" bpb {r['bpb']:.3f}" if "bpb" in r else ""
            print(
                f"step {self.trainer.step} epoch {epoch}: loss {r['loss']:.4f}{extra} "
                f"K {r['K']:.3f} C {r['C']:.3f} S {r['S']:.3f} lr {r['lr']:.2e}"
            )

    def validate(self) -> dict[str, float]:
        return evaluate(self.trainer.model, self.val, self.cfg.batch_size, self.cfg.eval_batches, self.cfg.amp)

    def evaluate(self, epoch: int, final: bool = False) -> None:
        record: dict[str, Any] = {"step": self.trainer.step, "epoch": epoch, "seconds": self.elapsed()}
        if self.val is not None:
            record.update(self.validate())
            score = record["val_loss"]
        else:
            score = record["train_loss"] = sum(self.losses) / max(1, len(self.losses))
        self.losses = []
        self.history.evals.append(record)
        if self.log and "val_bpb" in record:
            print(f"eval step {self.trainer.step}: val_loss {record['val_loss']:.4f} val_bpb {record['val_bpb']:.3f}")
        if self.rule is not None and not final:  # a growth at the end trains nothing
            model = self.trainer.model
            strategy = self.rule.observe(score, model.config, len(self.history.expansions))
            if strategy is not None:
                self.grow(strategy, epoch)

    def grow(self, strategy: str, epoch: int) -> None:
        old, step = self.trainer.model, self.trainer.step
        grown = expand_model(old, strategy, generator=self.generator)
        grown.train(old.training)
        optimizer = expand_optimizer(self.trainer.optimizer, old, grown)
        rng = self.trainer.rng.get_state()
        self.trainer = Trainer(grown, self.cfg, optimizer, total_steps=self.total)
        self.trainer.step = self.trainer.grown_at = step
        self.trainer.rng.set_state(rng)
        event = {
            "step": step,
            "epoch": epoch,
            "strategy": strategy,
            "params_before": old.num_parameters(),
            "params_after": grown.num_parameters(),
        }
        if self.val is not None:
            event["val_loss_before"] = self.history.evals[-1]["val_loss"]
            event["val_loss_after"] = self.validate()["val_loss"]
        self.history.expansions.append(event)
        self.history.model = grown
        if self.log:
            print(
                f"expanded model by {strategy} at step {step}: "
                f"{event['params_before']:,} -> {event['params_after']:,} parameters"
            )


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
    ``diffusion``, ``scale_patience``, ...; bitlm.objectives describes the objectives).
    ``val_data`` is evaluated every ``eval_every`` steps and at the end. ``callback(record)``
    sees each step's record and may return True to stop. ``model`` may be wrapped for data
    parallelism (DDP, or sharded in place by bitlm.distributed.wrap_fsdp).
    """
    names = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"train_loop got unknown argument(s) {unknown}; see TrainConfig for valid ones")
    cfg = TrainConfig(
        epochs=epochs, batch_size=batch_size, accum_steps=accum_steps, amp=amp, compile_model=compile_model, **kwargs
    )
    val = _as_windows(val_data) if val_data is not None else None
    return _Loop(model, _as_windows(data), val, cfg, optimizer, log, callback).run()


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
