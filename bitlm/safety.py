"""The safety gate: block outputs whose complexity (C) or symbiosis (S) falls below a floor.

Inference-time telemetry uses the forms defined in :mod:`bitlm.telemetry`:

- ``hil_safe_inference`` gates a forward pass on the model's own C and S (the logit forms).
- ``safe_sample_with_retry`` gates generated text on C measured exactly on the generated data
  bits (LZ76, so a degenerate repetitive output scores low) and S of the generation logits
  against the generated bits' distribution, retrying with another strategy when blocked.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .telemetry import lz_complexity, negentropy_logits, symbiosis_score, telemetry_summary


class SafetyError(RuntimeError):
    """Output blocked by the safety gate; ``metrics`` holds the values that failed."""

    def __init__(self, message: str, metrics: dict[str, float] | None = None, attempts: list | None = None):
        super().__init__(message)
        self.metrics = metrics or {}
        self.attempts = attempts or []


class SafetyGate:
    """Exponential-moving-average gate over C and S.

    Each ``should_trigger(c, s)`` call updates ``ema = decay * ema + (1 - decay) * value``
    (the first value initializes it) and returns True when either EMA is below its floor. The
    first ``burn_in`` calls only warm the EMAs up and never trigger: a gate has no opinion
    before it has seen ``burn_in`` values. (The original guide's one-call example expects True
    with ``burn_in=10``; that contradicts its own advice to raise burn_in to trigger less.)
    """

    def __init__(self, c_floor: float = 0.3, s_floor: float = 0.5, decay: float = 0.9, burn_in: int = 10):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {burn_in}")
        self.c_floor, self.s_floor, self.decay, self.burn_in = c_floor, s_floor, decay, burn_in
        self.reset()

    def reset(self) -> None:
        self.ema_c: float | None = None
        self.ema_s: float | None = None
        self.steps = 0

    def update(self, c_val: float, s_val: float) -> None:
        c_val, s_val = float(c_val), float(s_val)
        if self.ema_c is None or self.ema_s is None:
            self.ema_c, self.ema_s = c_val, s_val
        else:
            self.ema_c = self.decay * self.ema_c + (1 - self.decay) * c_val
            self.ema_s = self.decay * self.ema_s + (1 - self.decay) * s_val
        self.steps += 1

    def should_trigger(self, c_val: float, s_val: float) -> bool:
        self.update(c_val, s_val)
        if self.steps <= self.burn_in:
            return False
        return self.ema_c < self.c_floor or self.ema_s < self.s_floor

    def failed_metrics(self) -> dict[str, float]:
        """The EMA values currently below their floors."""
        out = {}
        if self.ema_c is not None and self.ema_c < self.c_floor:
            out["C"] = self.ema_c
        if self.ema_s is not None and self.ema_s < self.s_floor:
            out["S"] = self.ema_s
        return out


def _check_floors(c: float, s: float, c_floor: float, s_floor: float) -> dict[str, float]:
    failed = {}
    if c < c_floor:
        failed["C"] = c
    if s < s_floor:
        failed["S"] = s
    return failed


def _blocked_message(failed: dict[str, float], c_floor: float, s_floor: float) -> str:
    floors = {"C": c_floor, "S": s_floor}
    parts = [f"{k}={v:.3f} < {k.lower()}_floor={floors[k]}" for k, v in failed.items()]
    return "Output blocked by safety gate: " + ", ".join(parts)


@torch.no_grad()
def hil_safe_inference(
    model: torch.nn.Module,
    bits: torch.Tensor,
    c_floor: float = 0.3,
    s_floor: float = 0.5,
    strict: bool = True,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward pass with a gate: returns (predicted next bits (B, T), telemetry).

    Raises :class:`SafetyError` naming the failing metrics when the batch's C or S is below
    its floor and ``strict``; otherwise warns and returns the output anyway.
    """
    logits, telemetry = model(bits)
    summary = telemetry_summary(telemetry)
    failed = _check_floors(summary["C"], summary["S"], c_floor, s_floor)
    if failed:
        message = _blocked_message(failed, c_floor, s_floor)
        if strict:
            raise SafetyError(message, failed)
        warnings.warn(message, stacklevel=2)
    return logits.argmax(-1), telemetry


@dataclass
class GateReport:
    """What the gate decided about one generation, for logs and HTTP responses."""

    K: float
    C: float
    S: float
    passed: bool
    failed: dict[str, float] = field(default_factory=dict)
    strategy: str = "sample"
    attempt: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__}


def assess_generation(new_bits: torch.Tensor, logits: torch.Tensor, c_floor: float, s_floor: float) -> GateReport:
    """Gate one generated sequence: new bits (T,) with the logits (T, 2) that chose them."""
    data_bits = new_bits.reshape(-1, 9)[:, :8].reshape(-1)
    c = lz_complexity(data_bits) if data_bits.numel() >= 2 else 1.0
    k = float(negentropy_logits(logits[None]).item())
    s = float(symbiosis_score(logits[None], bits=new_bits[None]).item())
    failed = _check_floors(c, s, c_floor, s_floor)
    return GateReport(K=k, C=c, S=s, passed=not failed, failed=failed)


def safe_sample_with_retry(
    model: torch.nn.Module,
    bits: Any,
    max_retries: int = 3,
    retry_strategy: str = "temperature",
    max_new_bytes: int = 32,
    c_floor: float = 0.3,
    s_floor: float = 0.5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate ``max_new_bytes`` after the prompt ``bits`` and gate the result.

    The first attempt samples at ``temperature``. When the gate blocks it, up to
    ``max_retries`` more attempts follow, by ``retry_strategy``: ``"temperature"`` raises the
    temperature by 0.25 each time (away from degenerate loops), ``"diffusion"`` regenerates the
    continuation by iterative denoising (see :mod:`bitlm.diffusion`). Returns (prompt and
    generated bits (1, T), telemetry with ``K, C, S``, ``gate`` and ``attempts``); raises
    :class:`SafetyError` when every attempt is blocked.
    """
    from .generate import generate_bits

    if retry_strategy not in ("temperature", "diffusion"):
        raise ValueError(f"retry_strategy must be 'temperature' or 'diffusion', got {retry_strategy!r}")
    prompt = torch.as_tensor(bits).long().reshape(1, -1)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    reports = []
    for attempt in range(max_retries + 1):
        strategy = "sample" if attempt == 0 else retry_strategy
        if strategy == "diffusion":
            from .diffusion import diffusion_generate

            out, logits = diffusion_generate(model, prompt, max_new_bytes, generator=generator, return_logits=True)
        else:
            temp = temperature + 0.25 * attempt if strategy == "temperature" else temperature
            out, logits = generate_bits(model, prompt, max_new_bytes, temp, top_p, generator, return_logits=True)
        new_bits = out[0, prompt.size(1) :]
        report = assess_generation(new_bits, logits[0], c_floor, s_floor)
        report.strategy, report.attempt = strategy, attempt
        reports.append(report.as_dict())
        if report.passed:
            telemetry = {"K": report.K, "C": report.C, "S": report.S, "gate": report.as_dict(), "attempts": reports}
            return out, telemetry
    last = reports[-1]
    raise SafetyError(
        _blocked_message(last["failed"], c_floor, s_floor) + f" after {len(reports)} attempts",
        last["failed"],
        reports,
    )
