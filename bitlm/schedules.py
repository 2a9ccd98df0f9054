"""Curricula as pure functions of the training step.

A schedule's only state is the step, so a run resumed from a checkpoint (or a model grown by
the scaling scheduler) continues its curriculum exactly where it was: save the step, nothing
else. ``progress`` below is ``step / total_steps`` clipped to [0, 1].
"""

from __future__ import annotations

import math

NOISE_SCHEDULES = ("linear", "cosine", "exp")
_EXP_RATE = 4.0


def noise_level(s: float, schedule: str = "linear") -> float:
    """Noise level u in [0, 1] at diffusion time s in [0, 1] (s = 1: pure noise)::

        linear: u = s
        cosine: u = 1 - cos(pi / 2 * s)
        exp:    u = (exp(4 s) - 1) / (exp(4) - 1)

    A bit at noise level u is replaced by a fair coin flip with probability u, i.e. flipped
    with probability u / 2 (see bitlm.diffusion).
    """
    s = min(1.0, max(0.0, float(s)))
    if schedule == "linear":
        return s
    if schedule == "cosine":
        return 1.0 - math.cos(math.pi / 2 * s)
    if schedule == "exp":
        return math.expm1(_EXP_RATE * s) / math.expm1(_EXP_RATE)
    raise ValueError(f"noise schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")


def diffusion_noise_scale(step: int, total_steps: int | None, final: float = 0.25) -> float:
    """The diffusion curriculum: the largest noise level trained at ``step``::

        scale = 1 - (1 - final) * progress

    so training starts on the full noise range and ends denoising at most ``final`` noise.
    Without a known total (``total_steps`` None) the scale stays 1.
    """
    if not total_steps:
        return 1.0
    progress = min(1.0, max(0.0, step / total_steps))
    return 1.0 - (1.0 - final) * progress


def compress_probability(step: int, compress_prob: float, compress_warmup: int = 0, ramp_steps: int = 0) -> float:
    """Probability that the batch at ``step`` is trained in compressed form::

    0                                          if step < compress_warmup
    compress_prob * min(1, (step - warmup + 1) / ramp_steps)   otherwise (ramp_steps > 0)
    compress_prob                              otherwise
    """
    if step < compress_warmup:
        return 0.0
    if ramp_steps > 0:
        return compress_prob * min(1.0, (step - compress_warmup + 1) / ramp_steps)
    return compress_prob


def sequence_length(step: int, full_bits: int, start_bits: int | None = None, ramp_steps: int = 0) -> int:
    """Window length in bits trained at ``step``: short windows first, the full context later::

        L = start + (full - start) * min(1, step / ramp_steps),  rounded down to whole bytes

    With no ramp (``ramp_steps`` 0 or ``start_bits`` None) it is ``full_bits``. Never below
    two bytes (18 bits).
    """
    if not ramp_steps or start_bits is None:
        return full_bits
    frac = min(1.0, max(0.0, step / ramp_steps))
    length = int(start_bits + (full_bits - start_bits) * frac)
    return max(18, min(full_bits, length - length % 9))
