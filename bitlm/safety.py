"""The guide's safety functions, on the one telemetry rule (bitlm.telemetry) and the one gated
generation loop (bitlm.gated).

- ``hil_safe_inference`` gates a forward pass on the model's own C and S (the logit forms).
- ``safe_sample_with_retry`` generates through the gated loop and judges each attempt on the
  whole generation: C measured exactly on all generated data bits (LZ76, so a degenerate
  repetitive output scores low) and S of all their predictions against the generated bits'
  distribution; a blocked attempt is retried by ``retry_strategy``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .gated import (
    Attempts,
    GateSettings,
    SafetyError,
    SafetyGate,
    blocked_message,
    diffusion_capacity,
    stream_bytes,
    verdict,
)
from .telemetry import RunningTelemetry, telemetry_summary

__all__ = [
    "GateReport",
    "SafetyError",
    "SafetyGate",
    "assess_generation",
    "hil_safe_inference",
    "safe_sample_with_retry",
]


def _failed(c: float, s: float, c_floor: float, s_floor: float) -> dict[str, float]:
    return {k: v for k, v, floor in (("C", c, c_floor), ("S", s, s_floor)) if v < floor}


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
    failed = _failed(summary["C"], summary["S"], c_floor, s_floor)
    if failed:
        message = blocked_message(failed, c_floor, s_floor)
        if strict:
            raise SafetyError(message, failed)
        warnings.warn(message, stacklevel=2)
    return logits.argmax(-1), telemetry


@dataclass
class GateReport:
    """What the gate decided about one whole generation."""

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
    """Gate one whole generated sequence: new bits (9n,) with the logits (9n, 2) that chose
    them, judged on the telemetry of all of it (bitlm.telemetry.RunningTelemetry)."""
    bits, logits = torch.as_tensor(new_bits).reshape(-1, 9), torch.as_tensor(logits).reshape(-1, 9, 2)
    running = RunningTelemetry(1)
    k = c = s = [float("nan")]
    for i in range(len(bits)):
        k, c, s = running.update(bits[i : i + 1], logits[i : i + 1])
    failed = _failed(c[0], s[0], c_floor, s_floor)
    return GateReport(K=k[0], C=c[0], S=s[0], passed=not failed, failed=failed)


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
    """Generate ``max_new_bytes`` after the prompt ``bits`` and gate the whole result.

    The first attempt samples at ``temperature``. When the gate blocks it, up to
    ``max_retries`` more attempts follow, by ``retry_strategy``: ``"temperature"`` samples
    0.25 hotter per retry, ``"diffusion"`` regenerates the continuation by iterative denoising
    (see :mod:`bitlm.gated`). Returns (prompt and generated bits (1, T), telemetry with
    ``K, C, S``, ``gate`` and ``attempts``); raises :class:`SafetyError` when every attempt is
    blocked.
    """
    gate = GateSettings(c_floor, s_floor, max_retries=max_retries, retry_strategy=retry_strategy)
    gate.check_model(model)
    if retry_strategy == "diffusion" and max_retries and max_new_bytes > diffusion_capacity(model):
        raise ValueError(
            f"{max_new_bytes} new bytes do not fit one denoising pass of this model "
            f"(at most {diffusion_capacity(model)}): lower max_new_bytes or retry by temperature"
        )
    device = next(model.parameters()).device
    prompt = torch.as_tensor(bits).long().reshape(1, -1).to(device)
    attempts = Attempts(gate, temperature, seed)
    reports: list[dict[str, Any]] = []
    for plan in attempts:  # the gated loop's whole-answer judgement (bitlm.gated.verdict)
        strategy = "diffusion" if plan.strategy == "diffusion" else "sample"
        open_gate = gate.open()
        events = list(
            stream_bytes(model, prompt, max_new_bytes, plan.temperature, top_p, plan.seed, open_gate, strategy)
        )
        failed = verdict(events, gate)
        attempts.record(plan, events, failed)
        last = events[-1] if events else None
        K, C, S = (last.K, last.C, last.S) if last else (float("nan"),) * 3
        report = GateReport(K, C, S, not failed, failed, plan.strategy, plan.attempt)
        reports.append(report.as_dict())
        if report.passed:
            new = torch.tensor([b for e in events for b in e.bits], dtype=torch.long, device=device)[None]
            out = torch.cat([prompt, new], 1)
            return out, {"K": report.K, "C": report.C, "S": report.S, "gate": report.as_dict(), "attempts": reports}
    last = reports[-1]
    raise SafetyError(
        blocked_message(last["failed"], c_floor, s_floor) + f" after {len(reports)} attempts", last["failed"], reports
    )
