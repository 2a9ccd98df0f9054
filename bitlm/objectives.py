"""Objectives: a batch of bit windows becomes (loss, stats). Every trainer calls this module
(``train_loop``, the Ray Train workers under every strategy, the pipeline's last stage, Tune
trials, the benchmarks), and no other module computes a bit loss.

Bits per byte (bpb) is the quality number the whole project reports. For next-bit logits
(B, T, 2) over windows that start on a byte boundary, the bit at position p (p >= 1) has
phase p mod 9; phases 0..7 are data bits and phase 8 is the parity bit::

    nll_p = -log2 softmax(logits[:, p - 1])[bits[:, p]]
    bpb        = sum over data positions of nll_p / (number of data positions / 8)
    parity_bpb = sum over parity positions of nll_p / number of parity positions

The parity bit's cost is reported apart and never mixed into bpb. ``from_byte=k`` scores only
the bytes k.. of each window (a byte-level model cannot predict byte 0, so comparisons with one
score bytes 1..W-1).

The training loss of a micro-batch (:class:`BitObjective`) is the mean cross-entropy in nats
over the targets its :class:`Plan` selects, plus the guide's regularizers
``lambda_K (1 - K) + lambda_C (1 - C) + lambda_S (1 - S)``. Which objective a micro-batch
trains is drawn from the config with the trainer's seeded generator:

- next-bit prediction on the window, the default;
- with probability ``compress_probability(step, compress_prob, compress_warmup)``, the
  window's *compressed form*: its run-length pairs written as 9-bit groups (the run's bit,
  then its length in 8 bits; bitlm.bits.rle_bit_stream), cut to the window length. The model
  reads that stream and predicts its next bit; padding past a short stream carries no loss;
- with probability ``direct_prob``, *direct bit prediction*: the loss is taken on the data bits
  only, the parity positions carry none, which is exactly what generation samples;
- with ``diffusion``, with probability ``diffusion_prob``, denoising (bitlm.diffusion) instead
  of next-bit prediction: the window is corrupted at a noise level drawn from
  ``noise_schedule`` (scaled down over training with ``diffusion_curriculum``), the model reads
  it with ``causal=False``, and ``logits[:, t]`` is scored against the clean bit t. Compression
  and direct apply to it the same way. One model learns both modes (``diffusion_prob`` 1: only
  denoising), so its causal sampling and its diffusion retry share a checkpoint.

With ``seq_ramp_start_bytes`` and ``seq_ramp_steps`` the windows are first cut to
``sequence_length(step, ...)`` bits (short windows early, the full context later). bpb and
parity bpb are reported for plain next-bit micro-batches only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .bits import byte_tensor_to_bits, rle_bit_stream
from .config import ModelConfig, TrainConfig
from .diffusion import corrupt, diffusion_levels
from .schedules import compress_probability, diffusion_noise_scale, sequence_length
from .telemetry import telemetry_summary
from .torch_utils import check_cpu_generator

LN2 = math.log(2)


# -- losses and bits per byte ---------------------------------------------------------------------


def bit_nll(logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """-log2 p of each next bit: (B, T-1), entry t is bit t+1 given bits <= t."""
    B, T, _ = logits.shape
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 2).float(), bits[:, 1:].reshape(-1), reduction="none")
    return nll.view(B, T - 1) / LN2


def nll_sums(logits: torch.Tensor, bits: torch.Tensor, from_byte: int = 0) -> dict[str, float]:
    """Summed bits of the data and parity predictions of byte-aligned windows, and how many
    bytes' worth of each were scored: the sums behind :func:`bits_per_byte`."""
    nll = bit_nll(logits.detach(), bits)
    p = torch.arange(1, bits.size(1), device=bits.device)
    scored = p >= 9 * from_byte
    data, parity = nll[:, scored & (p % 9 < 8)], nll[:, scored & (p % 9 == 8)]
    return {
        "data_bits": float(data.sum()),
        "data_bytes": data.numel() / 8,
        "parity_bits": float(parity.sum()),
        "parity_count": parity.numel(),
    }


def bits_per_byte(logits: torch.Tensor, bits: torch.Tensor, from_byte: int = 0) -> dict[str, float]:
    """``{"bpb", "parity_bpb"}`` of byte-aligned windows (see the module docstring)."""
    s = nll_sums(logits, bits, from_byte)
    return {
        "bpb": s["data_bits"] / max(s["data_bytes"], 1e-9),
        "parity_bpb": s["parity_bits"] / s["parity_count"] if s["parity_count"] else 0.0,
    }


def next_bit_loss(logits: torch.Tensor, bits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-bit cross-entropy in nats over the predicted positions ``mask`` (B, T-1)
    selects (default: all of them)."""
    return _masked_mean(_ce(logits[:, :-1], bits[:, 1:]), mask)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in nats of each target (B, T) under its logits (B, T, 2)."""
    B, T = targets.shape
    return F.cross_entropy(logits.reshape(-1, 2).float(), targets.reshape(-1), reduction="none").view(B, T)


def _masked_mean(nll: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return nll.mean()
    mask = mask.float()
    return (nll * mask).sum() / mask.sum().clamp_min(1)


def compressed_batch(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each window replaced by its run-length-compressed form (bitlm.bits.rle_bit_stream),
    cut or zero-padded to the window length, and a (B, T) mask of the real positions."""
    rows = batch.cpu().numpy()  # the codec is numpy: one copy to the host and one back
    out, mask = np.zeros_like(rows), np.zeros(rows.shape, dtype=bool)
    for i, row in enumerate(rows):  # one call per window; vectorized within it
        stream = rle_bit_stream(row)[: rows.shape[1]]
        out[i, : stream.size] = stream
        mask[i, : stream.size] = True
    return torch.from_numpy(out).to(batch.device), torch.from_numpy(mask).to(batch.device)


def data_bit_mask(T: int, device: torch.device | None = None) -> torch.Tensor:
    """(T,) True at data-bit positions (phase 0..7) of a byte-aligned window."""
    return torch.arange(T, device=device) % 9 < 8


def telemetry_penalty(config: ModelConfig, telemetry: dict[str, Any]) -> torch.Tensor | float:
    """lambda_K (1 - K) + lambda_C (1 - C) + lambda_S (1 - S): the guide's regularizers."""
    penalty: torch.Tensor | float = 0.0
    for lam, key in (
        (config.lambda_K, "negentropy_logits"),
        (config.lambda_C, "lz_complexity_logits"),
        (config.lambda_S, "symbiosis_score"),
    ):
        if lam > 0:
            penalty = penalty + lam * (1 - telemetry[key])
    return penalty


# -- the training objective ----------------------------------------------------------------------


@dataclass
class Plan:
    """What the model is asked to do for one micro-batch.

    ``inputs`` (B, T) are the bits it reads, ``targets`` (B, T) the bits it is scored on:
    target t is predicted by ``logits[:, t - 1]`` when ``causal`` (target 0 by nothing) and by
    ``logits[:, t]`` when denoising. ``mask`` (B, T) marks the targets that carry loss (None:
    all of them). ``telemetry``: whether the forward pass measures K, C, S."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor | None
    causal: bool
    stats: dict[str, float] = field(default_factory=dict)
    telemetry: bool = True


class BitObjective:
    """The objective of every bit-level trainer (see the module docstring).

    ``plan(batch, step)`` draws the micro-batch's objective and builds its :class:`Plan`;
    ``loss(logits, telemetry, plan)`` scores the model's output; calling the objective with a
    forward function does both around one forward pass. ``generator`` decides every draw, so a
    run's objectives follow from the seed and the step, and resume exactly with its state;
    ``rank`` varies the diffusion noise between data-parallel ranks. It is a CPU generator on
    every device (a GeneratorDeviceError otherwise): its draws are decisions the host makes,
    the same on any device, and its state restores anywhere. The noise tensors themselves are
    drawn on the batch's device, by a generator built there from a seed it draws."""

    def __init__(
        self,
        cfg: TrainConfig,
        model_config: ModelConfig,
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
        rank: int = 0,
    ):
        self.cfg, self.model_config, self.total_steps, self.rank = cfg, model_config, total_steps, rank
        self.generator = generator if generator is not None else torch.Generator().manual_seed(cfg.seed)

    @property
    def generator(self) -> torch.Generator:
        return self._generator

    @generator.setter
    def generator(self, generator: torch.Generator) -> None:
        check_cpu_generator(generator, "BitObjective")
        self._generator = generator

    def measures_telemetry(self, step: int) -> bool:
        """Whether the micro-batches of the step after ``step`` steps measure K, C, S: when a
        regularizer needs them (a lambda > 0), else only on the steps that are logged (the
        first and every ``train.log_every``-th, as train_loop and the Ray workers log them).
        Measuring costs host-side LZ76 parses, a sizeable part of a small model's step on a
        CPU, for numbers nobody reads on the other steps."""
        m = self.model_config
        return m.lambda_K > 0 or m.lambda_C > 0 or m.lambda_S > 0 or step == 0 or (step + 1) % self.cfg.log_every == 0

    def _draw(self, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=self.generator)) < p

    def plan(self, batch: torch.Tensor, step: int) -> Plan:
        cfg = self.cfg
        if cfg.seq_ramp_start_bytes is not None and cfg.seq_ramp_steps:
            batch = batch[:, : sequence_length(step, batch.size(1), 9 * cfg.seq_ramp_start_bytes, cfg.seq_ramp_steps)]
        B, T = batch.shape
        compress_p = compress_probability(step, cfg.compress_prob, cfg.compress_warmup)
        compressed, direct = self._draw(compress_p), self._draw(cfg.direct_prob)
        stats = {"compressed": float(compressed), "direct": float(direct), "compress_p": compress_p, "seq_bits": T}
        stats["denoise"] = 0.0
        telemetry = self.measures_telemetry(step)
        mask = None
        if compressed:
            batch, mask = compressed_batch(batch)
        if direct:
            data = data_bit_mask(T, batch.device).expand(B, T)
            mask = data if mask is None else mask & data
        if not (cfg.diffusion and self._draw(cfg.diffusion_prob)):
            return Plan(batch, batch, mask, True, stats, telemetry)
        scale = diffusion_noise_scale(step, self.total_steps) if cfg.diffusion_curriculum else 1.0
        levels = diffusion_levels(B, cfg.noise_schedule, scale, self.generator)
        # Noise is drawn on the batch's device (no host round trip) from a seed the CPU generator gives.
        seed = int(torch.randint(0, 2**62, (), generator=self.generator)) + self.rank
        noise = torch.Generator(device=batch.device).manual_seed(seed)
        stats["noise_scale"], stats["denoise"] = scale, 1.0
        return Plan(corrupt(batch, levels.to(batch.device), noise), batch, mask, False, stats, telemetry)

    def loss(self, logits: torch.Tensor, telemetry: dict[str, Any], plan: Plan) -> tuple[torch.Tensor, dict[str, Any]]:
        if plan.causal:
            mask = None if plan.mask is None else plan.mask[:, 1:]
            loss = _masked_mean(_ce(logits[:, :-1], plan.targets[:, 1:]), mask)
        else:
            loss = _masked_mean(_ce(logits, plan.targets), plan.mask)
        stats = {**plan.stats, "loss": loss.item(), **(telemetry_summary(telemetry) if telemetry else {})}
        if plan.causal and plan.mask is None:  # a plain next-bit batch (compression comes masked)
            stats.update(bits_per_byte(logits.detach(), plan.targets))
        return loss + telemetry_penalty(self.model_config, telemetry), stats

    def __call__(self, forward: Callable, batch: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, Any]]:
        plan = self.plan(batch, step)
        logits, telemetry = forward(plan.inputs, causal=plan.causal, telemetry=plan.telemetry)
        return self.loss(logits, telemetry, plan)


# -- evaluation ----------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: torch.Tensor,
    batch_size: int = 16,
    max_batches: int | None = None,
    amp: bool = False,
    from_byte: int = 0,
    as_bytes: bool = False,
) -> dict[str, float]:
    """Validation ``{"val_loss", "val_bpb", "val_parity_bpb"}`` over windows (N, T): loss the
    mean next-bit cross-entropy (nats), bpb and parity bpb over all scored bytes.

    ``as_bytes``: ``data`` holds windows of bytes (uint8, (N, W)), not bits; each batch becomes
    bits on the model's device (a split held as bytes takes 1/72 of the memory of int64 bits).

    With ``max_batches`` it reads that many batches of windows spread evenly over ``data``
    (the same ones every call), so a partial evaluation still samples the whole split.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    data = torch.as_tensor(data)
    if max_batches is not None and len(data) > max_batches * batch_size:
        data = data[torch.linspace(0, len(data) - 1, max_batches * batch_size).long()]
    if len(data) == 0:
        raise ValueError("evaluate() got no validation windows")
    loss_sum, n = 0.0, 0
    sums = {"data_bits": 0.0, "data_bytes": 0.0, "parity_bits": 0.0, "parity_count": 0}
    for i in range(0, len(data), batch_size):
        batch = data[i : i + batch_size].to(device, non_blocking=True)
        batch = byte_tensor_to_bits(batch) if as_bytes else batch.long()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits, _ = model(batch, telemetry=False)
        loss_sum += float(_ce(logits[:, :-1], batch[:, 1:]).sum())
        n += batch[:, 1:].numel()
        for k, v in nll_sums(logits, batch, from_byte).items():
            sums[k] += v
    model.train(was_training)
    return {
        "val_loss": loss_sum / n,
        "val_bpb": sums["data_bits"] / max(sums["data_bytes"], 1e-9),
        "val_parity_bpb": sums["parity_bits"] / sums["parity_count"] if sums["parity_count"] else 0.0,
    }
