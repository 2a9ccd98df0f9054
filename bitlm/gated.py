"""The one gated generation loop: prompt -> bits -> gate -> retries -> events.

Ray Serve (serve/), the playground and ``safe_sample_with_retry`` all generate through here.

One *attempt* generates up to ``max_new_bytes`` bytes for a batch of prompts of equal length,
by sampling (bitlm.generate, the KV cache, parity set by the codec) or by iterative denoising
(bitlm.diffusion); every byte gets the K, C, S of everything generated so far
(bitlm.telemetry.RunningTelemetry). Two ways to judge it:

- a *whole answer* (``complete``, Serve's non-streamed completions, ``safe_sample_with_retry``)
  is judged once, on the telemetry of all of it (:func:`verdict`: C and S against the floors);
- a *stream* cannot take back what it sent: each byte's running C and S go to the request's
  :class:`SafetyGate` (floors, EMA decay, burn-in) before the byte is sent, and a trigger ends
  the stream there (its last event says ``blocked``). It is the stricter of the two: a prefix
  of ordinary text (a table's rule of dashes) can look repetitive before its text resumes.

*Retries*: when an attempt is blocked, :class:`Attempts` plans the next one by the gate's
``retry_strategy``: ``"temperature"`` samples again 0.25 hotter per retry (away from degenerate
loops) with the next seed, ``"diffusion"`` regenerates the continuation by denoising with the
same model (one trained in both modes, ``train.diffusion``; a model that never learned to
denoise is refused). After ``max_retries`` blocked retries the answer is a content filter.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .bits import bits_to_bytes, bytes_to_bits, parity_ok
from .diffusion import diffusion_generate
from .generate import GeneratedByte, iter_generate
from .telemetry import RunningTelemetry

RETRY_STRATEGIES = ("temperature", "diffusion")
TEMPERATURE_STEP = 0.25  # how much hotter each temperature retry samples


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


def blocked_message(failed: dict[str, float], c_floor: float, s_floor: float) -> str:
    floors = {"C": c_floor, "S": s_floor}
    parts = [f"{k}={v:.3f} < {k.lower()}_floor={floors[k]}" for k, v in failed.items()]
    return "Output blocked by safety gate: " + ", ".join(parts)


@dataclass
class GateSettings:
    """The gate a generation runs under (a server's are changeable while it runs)."""

    c_floor: float = 0.3  # the user guide's floors
    s_floor: float = 0.5
    decay: float = 0.9
    burn_in: int = 16  # bytes generated before the gate may block
    max_retries: int = 2
    retry_strategy: str = "temperature"  # or "diffusion" (arch="bit" models only)

    def __post_init__(self) -> None:
        if self.retry_strategy not in RETRY_STRATEGIES:
            raise ValueError(f"retry_strategy must be one of {RETRY_STRATEGIES}, got {self.retry_strategy!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        SafetyGate(self.c_floor, self.s_floor, self.decay, self.burn_in)  # checks decay and burn-in

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a retry strategy the model cannot run."""
        if self.retry_strategy == "diffusion":
            _check_diffusion(model)

    def new_gate(self) -> SafetyGate:
        return SafetyGate(self.c_floor, self.s_floor, self.decay, self.burn_in)

    def open(self) -> GateSettings:
        """These settings with a gate that never cuts a generation short (its burn-in never
        ends): a whole answer runs to its length and is judged by :func:`verdict`."""
        return GateSettings(self.c_floor, self.s_floor, self.decay, 2**62, self.max_retries, self.retry_strategy)


def verdict(events: list[ByteEvent], gate: GateSettings) -> dict[str, float]:
    """The metrics of a whole generation below their floors (empty: it passes). Judged on the
    telemetry of all of it: its last event's running values."""
    if not events:
        return {}  # nothing generated, nothing to judge
    last = events[-1]
    return {k: v for k, v, floor in (("C", last.C, gate.c_floor), ("S", last.S, gate.s_floor)) if v < floor}


@dataclass
class ByteEvent:
    """One generated byte, the telemetry of the generation up to and including it
    (bitlm.telemetry.RunningTelemetry) and the gate's state after it."""

    index: int
    byte: int
    bits: list[int]
    K: float
    C: float
    S: float
    blocked: bool = False
    failed: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:  # dataclasses.asdict's result, without its recursive deep copy
        return {**vars(self), "bits": list(self.bits), "failed": dict(self.failed)}


# -- one attempt -------------------------------------------------------------------------------


def _check_diffusion(model: torch.nn.Module) -> None:
    """Refuse denoising with a model that never learned it (its retry would be noise)."""
    modes = getattr(model, "trained_modes", set())
    if "denoise" not in modes:
        raise ValueError(
            f"diffusion generation needs a model trained to denoise (train.diffusion: true); "
            f"this one was trained in modes {sorted(modes) or 'none'}"
        )


def diffusion_capacity(model: torch.nn.Module) -> int:
    """The most bytes one denoising attempt generates: the model's context, less one byte."""
    return model.io.max_bits // 9 - 1


def _diffusion_bytes(model, prompt_bits: torch.Tensor, max_new_bytes: int, generator) -> Iterator[GeneratedByte]:
    """A denoising attempt: the whole continuation at once (at most ``diffusion_capacity``
    bytes), then handed out byte by byte."""
    n = min(max_new_bytes, diffusion_capacity(model))
    out, log_q = diffusion_generate(model, prompt_bits, n, generator=generator, return_log_q=True)
    new = out[:, prompt_bits.size(1) :]
    for i in range(n):
        yield GeneratedByte(new[:, 9 * i : 9 * i + 9], log_q=log_q[:, i])


def _generators(seeds: list[int | None], device) -> list[torch.Generator | None]:
    """One generator per seeded request, on the model's device; None draws from the global
    generator (which a caller's torch.manual_seed governs)."""
    return [None if s is None else torch.Generator(device=device).manual_seed(s) for s in seeds]


def _prompt_bits(prompts: list[bytes] | torch.Tensor) -> torch.Tensor:
    if isinstance(prompts, torch.Tensor):
        bits = prompts.long()
    else:
        if len({len(p) for p in prompts}) != 1:
            raise ValueError("stream_batch needs prompts of equal length")
        bits = torch.from_numpy(bytes_to_bits(b"".join(prompts)).reshape(len(prompts), -1)).long()
    if bits.dim() != 2 or bits.size(1) == 0 or bits.size(1) % 9:
        raise ValueError(f"prompts must be whole bytes of bits (B, 9n), got shape {tuple(bits.shape)}")
    return bits


def stream_batch(
    model: torch.nn.Module,
    prompts: list[bytes] | torch.Tensor,
    max_new_bytes: list[int],
    temperature: list[float],
    top_p: list[float],
    seeds: list[int | None],
    gate: GateSettings | None = None,
    strategy: str = "sample",
    draft: int | None = None,
) -> Iterator[list[ByteEvent | None]]:
    """One attempt for several requests whose prompts (bytes, or bits (B, 9n)) have the same
    length, decoded as one batch: each step yields one event per request (None once that
    request has finished). Each request keeps its own sampling settings, seed and gate, so its
    bytes equal what it would get alone (up to float rounding in batched matrix products).
    ``strategy="diffusion"`` denoises instead (a batch of one: its request's seed). ``draft``:
    iter_generate's (by default, one greedy request speculates)."""
    prompt_bits = _prompt_bits(prompts)
    gate = gate or GateSettings()
    device = next(model.parameters()).device
    if strategy == "diffusion":
        _check_diffusion(model)
        steps = _diffusion_bytes(model, prompt_bits, max(max_new_bytes), _generators(seeds[:1], device)[0])
    else:
        temps, tops = torch.tensor(temperature, device=device), torch.tensor(top_p, device=device)
        steps = iter_generate(
            model, prompt_bits, max(max_new_bytes), temps, tops, _generators(seeds, device), True, draft
        )
    return _gated(model, prompt_bits, steps, max_new_bytes, gate)


def _gated(model, prompt_bits: torch.Tensor, steps, max_new_bytes: list[int], gate: GateSettings):
    """Per byte of ``steps`` (bits (B, 9) and the logits behind them): the telemetry of
    everything so far and each request's gate verdict."""
    B = prompt_bits.size(0)
    gates = [gate.new_gate() for _ in range(B)]
    last = prompt_bits[:, -9:-1].cpu() * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])
    running = RunningTelemetry(B, getattr(model, "reference", None), last.sum(-1))
    done = [False] * B
    for i, step in enumerate(steps):
        bits = step.bits.cpu()
        K, C, S = running.update(bits, surprisal=step.surprisal())
        data, rows = bits_to_bytes(bits.reshape(-1)), bits.tolist()  # every row's byte (parity checked) at once
        out: list[ByteEvent | None] = []
        for b in range(B):
            if done[b] or i >= max_new_bytes[b]:
                done[b] = True
                out.append(None)
                continue
            blocked = gates[b].should_trigger(C[b], S[b])
            done[b] = blocked
            failed = gates[b].failed_metrics() if blocked else {}
            out.append(ByteEvent(i, data[b], rows[b], K[b], C[b], S[b], blocked, failed))
        yield out
        if all(done):
            return


@torch.no_grad()
def gate_text(model: torch.nn.Module, prompt: bytes, text: bytes, gate: GateSettings | None = None) -> list[ByteEvent]:
    """The gate applied to a given ``text`` after ``prompt`` as if the model had generated it:
    the model reads prompt + text (teacher-forced) and each byte of the text gets the
    telemetry and verdict a generated one would. The events stop at a block."""
    from .model import infer_long_sequence

    prompt_bits = _prompt_bits([prompt])
    text_bits = torch.from_numpy(bytes_to_bits(text)).long()[None]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        bits = torch.cat([prompt_bits, text_bits], 1).to(device)
        logits = infer_long_sequence(model, bits, overlap=model.io.max_bits // 9 // 2 * 9)  # half a context
    finally:
        model.train(was_training)
    start = prompt_bits.size(1) - 1  # logits[:, j - 1] predicts bit j
    steps = (
        GeneratedByte(text_bits[:, 9 * i : 9 * i + 9], logits[:, start + 9 * i : start + 9 * i + 9])
        for i in range(len(text))
    )
    return [events[0] for events in _gated(model, prompt_bits, steps, [len(text)], gate or GateSettings())]


def stream_bytes(
    model: torch.nn.Module,
    prompt: bytes | torch.Tensor,
    max_new_bytes: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    gate: GateSettings | None = None,
    strategy: str = "sample",
) -> Iterator[ByteEvent]:
    """One attempt for one request: its events; the last has ``blocked=True`` when the gate
    stopped the generation there."""
    prompts = prompt.reshape(1, -1) if isinstance(prompt, torch.Tensor) else [prompt]
    for events in stream_batch(model, prompts, [max_new_bytes], [temperature], [top_p], [seed], gate, strategy):
        if events[0] is None:
            return
        yield events[0]


# -- retries -----------------------------------------------------------------------------------


@dataclass
class AttemptPlan:
    """How attempt ``attempt`` generates."""

    attempt: int
    strategy: str  # "sample" (the first attempt), "temperature" or "diffusion"
    temperature: float
    seed: int | None


@dataclass
class Completion:
    """A finished gated generation: the kept bytes (none when every attempt was blocked)."""

    data: bytes
    bits: list[int]
    events: list[ByteEvent]
    finish_reason: str  # "length" | "content_filter"
    attempts: list[dict[str, Any]]

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")

    @property
    def passed(self) -> bool:
        return self.finish_reason != "content_filter"

    def summary(self) -> dict[str, float]:
        """K, C, S of the last attempt's whole generation."""
        if not self.events:
            return {"K": math.nan, "C": math.nan, "S": math.nan}
        last = self.events[-1]
        return {"K": last.K, "C": last.C, "S": last.S}


class Attempts:
    """The retry loop, whoever runs the attempts (in-process here, batched by Serve)::

        attempts = Attempts(gate, temperature, seed)
        for plan in attempts:
            attempts.record(plan, events_of_an_attempt_run_by(plan))
        completion = attempts.completion()

    Iteration stops after the first attempt that passes, or after ``max_retries`` retries.
    """

    def __init__(self, gate: GateSettings, temperature: float, seed: int | None, max_retries: int | None = None):
        self.gate, self.temperature, self.seed = gate, temperature, seed
        self.max_retries = gate.max_retries if max_retries is None else max_retries
        self.log: list[dict[str, Any]] = []
        self.events: list[ByteEvent] = []
        self.passed = False

    def plan(self, attempt: int) -> AttemptPlan:
        seed = None if self.seed is None else self.seed + attempt
        if attempt == 0:
            return AttemptPlan(0, "sample", self.temperature, seed)
        strategy = self.gate.retry_strategy
        hotter = self.temperature + TEMPERATURE_STEP * attempt if strategy == "temperature" else self.temperature
        return AttemptPlan(attempt, strategy, hotter, seed)

    def __iter__(self) -> Iterator[AttemptPlan]:
        for attempt in range(self.max_retries + 1):
            yield self.plan(attempt)
            if self.passed:
                return

    def record(self, plan: AttemptPlan, events: list[ByteEvent], failed: dict[str, float] | None = None) -> bool:
        """Record an attempt's events and whether it passed: by ``failed`` (a whole answer's
        :func:`verdict`) or, for a stream, by its last event. Returns whether it passed."""
        if failed is None:
            failed = events[-1].failed if events and events[-1].blocked else {}
        blocked = bool(failed)
        self.events, self.passed = list(events), not blocked
        self.log.append(
            {
                "attempt": plan.attempt,
                "strategy": plan.strategy,
                "temperature": plan.temperature,
                "blocked": blocked,
                "bytes": len(events),
                "failed": failed,
            }
        )
        return self.passed

    def completion(self) -> Completion:
        if not self.passed:
            return Completion(b"", [], self.events, "content_filter", self.log)
        data = bytes(e.byte for e in self.events)
        return Completion(data, [b for e in self.events for b in e.bits], self.events, "length", self.log)


def complete(
    model: torch.nn.Module,
    prompt: bytes,
    max_new_bytes: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    gate: GateSettings | None = None,
) -> Completion:
    """A whole answer to one request, judged on all of it, with retries by the gate's strategy."""
    gate = gate or GateSettings()
    gate.check_model(model)
    attempts = Attempts(gate, temperature, seed)
    for plan in attempts:
        strategy = "diffusion" if plan.strategy == "diffusion" else "sample"
        events = stream_bytes(model, prompt, max_new_bytes, plan.temperature, top_p, plan.seed, gate.open(), strategy)
        events = list(events)
        attempts.record(plan, events, verdict(events, gate))
    return attempts.completion()


def parity_status(bits: list[int]) -> dict[str, Any]:
    """Whether every generated byte passes its parity check (it always should)."""
    if not bits:
        return {"ok": True, "bytes": 0}
    ok = parity_ok(bits)
    return {"ok": bool(ok.all()), "bytes": int(ok.size), "failed_bytes": [int(i) for i in (~ok).nonzero()[0][:10]]}
