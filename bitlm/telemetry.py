"""K / C / S telemetry: the three numbers, each in [0, 1], that bitlm reports and gates on,
with the meanings the user guide gives them. Defined here and only here.

They judge a sequence of bytes x (its data bits; parity is a function of them and never counts),
together with the model's predictions of its bits where a model is involved:

K, negentropy -- departure from randomness: one minus the bits per data bit of the shorter of
two codes for x, the model's predictions and x's own Lempel-Ziv parse::

    K = 1 - min(1, mean_t -log2 p_t(x_t), L),    L = c_LZ76(x) / E[c_LZ76(|x| random bits)]

  over the data bits t of x. p_t the model's predicted distribution of bit t (teacher-forced
  over a given text; for a generated text, the distributions its bits were drawn from). L is
  one parse of all of x (``lz_code_rate``), not C's blocks below: a repetition's code gets
  shorter the longer it runs, and K should say so. Noise costs a bit per bit either way: K ~ 0.
  Repetition costs its parse almost nothing, whatever the model knows: K -> 1 (a short phrase
  looped over 240 bytes ~0.92). Text the model knows sits between (1 - its bits per byte / 8,
  ~0.75 for the demo's model).

C, Lempel-Ziv complexity -- how much new structure x keeps producing::

    C = min(1, sum_k c_LZ76(d_k) / sum_k E[c_LZ76(|d_k| random bits)])

  d_k the data bits of x in blocks of ``LZ_BLOCK_BITS`` (1024: 128 bytes), each parsed on its
  own; c_LZ76 the Lempel-Ziv (1976) phrase count; the expectation for random bits a table
  measured once (``LZ76_RANDOM``, within 1%). Noise scores ~1 at every length, repetition -> 0
  (a byte repeated ~0.03, a short phrase looped ~0.1), prose ~0.7. Blocks keep text's C stable
  with length: one parse of a long text keeps finding old phrases, and its ratio drifts down.

S, symbiosis -- agreement with the reference distribution the model carries::

    S = 2 ** -(max(0, mean_i s_i - H_ref) / 2),    s_i = -log2 r(x_i | x_{i-1})

  r the byte-bigram distribution of the data the model was trained on (bitlm.reference:
  recorded by the Trainer, saved with the checkpoint; the built-in corpus's until something is
  recorded), H_ref its own conditional entropy. Text like the training data costs about H_ref
  per byte: S near 1; every two bits per byte beyond halve S (random letters ~0.1, random
  bytes ~0.01; the first byte, scored by the unigram, is not counted). S depends on the text
  and the reference only: a confident model is not penalized for being confident.

The forward pass reports them over its input bits (``logit_telemetry``); generation keeps them
over everything generated so far (:class:`RunningTelemetry`). Regularizers (lambda_K, C, S)
need gradients: each reports the measured value and carries the gradient of a differentiable
part (straight through): for K the model's surprisal, for C the order-2 entropy rate of the
predicted bits (``lz_complexity_logits``), for S the expected reference surprisal of the
model's predictions.

Which positions count (the one rule): the model's predictions of data bits. A next-bit logit
at position t predicts bit ``offset + t + 1`` (``offset + t`` when denoising), whose phase in
its byte decides (0..7 data, 8 parity).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .bits import _as_numpy_bits
from .reference import Reference, builtin_reference, byte_values

_EPS = 1e-9
# Mean LZ76 phrase count of n random bits (200 sequences each up to 1024 bits, 40 to 4096,
# 10 beyond; tests/test_telemetry.py re-measures it); between points log-log interpolation,
# beyond the last n / log2 n scaling.
LZ76_RANDOM = {
    8: 3.88, 16: 5.49, 32: 8.36, 64: 13.04, 128: 21.2, 256: 36.01, 512: 61.61,
    1024: 109.04, 2048: 194.72, 4096: 353.48, 8192: 651.9, 16384: 1198.6,
}  # fmt: skip
_LZ_N = sorted(LZ76_RANDOM)


# -- K: negentropy ----------------------------------------------------------------------------


def negentropy(bits: Any) -> float:
    """The model-free K of a concrete bit sequence: 1 - binary entropy of its fraction of ones
    (order 0: it sees a constant sequence, not structure; the model's K above does)."""
    arr = _as_numpy_bits(bits).reshape(-1)
    if arr.size == 0:
        raise ValueError("negentropy of an empty bit sequence is undefined")
    p = float(arr.mean())
    h = -sum(x * math.log2(x) for x in (p, 1 - p) if x > 0)
    return 1.0 - h


def negentropy_logits(logits: torch.Tensor, bits: torch.Tensor | None = None) -> torch.Tensor:
    """K per sequence (B,) from predictions (B, T, 2): ``1 - min(1, mean surprisal in bits)``
    of the bits (B, T) each row predicts; without ``bits``, of the predictions' own entropy
    (the expected surprisal of bits drawn from them)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    if bits is None:
        surprisal = -(logp.exp() * logp).sum(-1) / math.log(2)
    else:
        surprisal = -logp.gather(-1, bits.long().unsqueeze(-1)).squeeze(-1) / math.log(2)
    return 1.0 - surprisal.mean(-1).clamp(0.0, 1.0)


# -- C: LZ complexity ------------------------------------------------------------------------


def lz76_count(bits: Any) -> int:
    """Exact Lempel-Ziv (1976) phrase count of a bit sequence (Kaspar & Schuster parsing)."""
    counter = LZ76()
    counter.extend(_as_numpy_bits(bits).reshape(-1))
    return counter.count


class LZ76:
    """Incremental LZ76 parsing: ``extend`` appends symbols, ``count`` is the phrase count of
    everything so far (the unfinished last phrase counted). Each phrase is the shortest
    substring starting where the last one ended that does not occur in the text before its own
    last symbol; finished phrases never change, so appending costs only the search for the
    phrases it completes (exponential then binary search, C-level substring search)."""

    def __init__(self):
        self.s, self.start, self.done = b"", 0, 0

    def extend(self, symbols: np.ndarray) -> None:
        self.s += np.asarray(symbols, dtype=np.uint8).tobytes()
        s, n, i = self.s, len(self.s), self.start
        while i < n:
            # Largest l such that s[i:i+l] occurs in s[:i+l-1]; monotone in l, so search it.
            lo, hi = 0, 1
            while i + hi <= n and s[i : i + hi] in s[: i + hi - 1]:
                lo, hi = hi, hi * 2
            hi = min(hi, n - i + 1)
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if s[i : i + mid] in s[: i + mid - 1]:
                    lo = mid
                else:
                    hi = mid
            if i + lo >= n:  # the phrase runs to the end: unfinished, it may still grow
                break
            self.done += 1
            i += lo + 1
        self.start = i

    @property
    def count(self) -> int:
        return self.done + (1 if self.start < len(self.s) else 0)


def lz76_random(n: int) -> float:
    """Expected LZ76 phrase count of n random bits (``LZ76_RANDOM``, interpolated)."""
    if n <= _LZ_N[0]:
        return LZ76_RANDOM[_LZ_N[0]] * n / _LZ_N[0]
    if n >= _LZ_N[-1]:
        last = _LZ_N[-1]
        return LZ76_RANDOM[last] * (n / math.log2(n)) / (last / math.log2(last))
    j = bisect.bisect_right(_LZ_N, n)
    n0, n1 = _LZ_N[j - 1], _LZ_N[j]
    w = math.log(n / n0) / math.log(n1 / n0)
    return math.exp((1 - w) * math.log(LZ76_RANDOM[n0]) + w * math.log(LZ76_RANDOM[n1]))


LZ_BLOCK_BITS = 1024


def lz_complexity(bits: Any) -> float:
    """C of a concrete bit sequence (the data bits of a text): LZ76 counts of its blocks over
    a random sequence's, clipped to 1."""
    arr = _as_numpy_bits(bits).reshape(-1)
    if arr.size < 2:
        raise ValueError("LZ complexity needs at least 2 bits")
    blocks = [arr[i : i + LZ_BLOCK_BITS] for i in range(0, arr.size, LZ_BLOCK_BITS)]
    return min(1.0, sum(lz76_count(b) for b in blocks) / sum(lz76_random(b.size) for b in blocks))


def lz_code_rate(bits: Any) -> float:
    """K's Lempel-Ziv term L of a concrete bit sequence: the LZ76 phrase count of one parse of
    all of it over a random sequence's of its length, clipped to 1."""
    arr = _as_numpy_bits(bits).reshape(-1)
    if arr.size < 2:
        raise ValueError("an LZ code rate needs at least 2 bits")
    return min(1.0, lz76_count(arr) / lz76_random(arr.size))


def _patterns(order: int, device: torch.device) -> torch.Tensor:
    k1 = order + 1
    idx = torch.arange(2**k1, device=device)
    return ((idx[:, None] >> torch.arange(k1 - 1, -1, -1, device=device)) & 1).float()


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log2(p.clamp_min(_EPS))).sum(-1)


def lz_complexity_logits(logits: torch.Tensor, order: int = 2) -> torch.Tensor:
    """C's differentiable surrogate per sequence (B,): the order-``order`` conditional entropy
    rate, in bits, of the predicted bit stream, with the (k+1)-gram distribution estimated softly
    as the mean over positions of the product of predicted bit probabilities. Constant or
    periodic predictions give ~0, fair coins 1. (It moves the way C does; the reported C is
    always the measured one.)"""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, 2)
    B, T, _ = logp.shape
    if T <= order:
        return (-(logp.exp() * logp).sum(-1) / math.log(2)).mean(-1).clamp(0.0, 1.0)
    win0 = logp[..., 0].unfold(1, order + 1, 1)  # (B, T-k, k+1): log P(bit = 0)
    win1 = logp[..., 1].unfold(1, order + 1, 1)
    pat = _patterns(order, logits.device)  # (2^(k+1), k+1)
    logq = win1 @ pat.T + win0 @ (1 - pat).T  # (B, T-k, 2^(k+1))
    joint = logq.exp().mean(1)  # (B, 2^(k+1)), sums to 1
    marginal = joint.view(B, 2**order, 2).sum(-1)  # drop the newest bit
    return (_entropy_bits(joint) - _entropy_bits(marginal)).clamp(0.0, 1.0)


# -- S: symbiosis ----------------------------------------------------------------------------


S_HALVING_BITS = 2.0  # bits per byte of excess reference surprisal that halve S


def symbiosis(excess_bits_per_byte: torch.Tensor | float) -> torch.Tensor:
    """S from a text's mean reference surprisal minus H_ref (bits per byte)."""
    return torch.exp2(-torch.as_tensor(excess_bits_per_byte).clamp_min(0.0) / S_HALVING_BITS)


def symbiosis_score(
    logits: torch.Tensor, reference: Reference | None = None, bits: torch.Tensor | None = None, offset: int = 0
) -> torch.Tensor:
    """S per sequence (B,) of byte-aligned ``bits`` (B, T) against ``reference`` (default: the
    built-in corpus's). Without ``bits``: the expected S of what ``logits`` (B, T, 2), next-bit
    predictions of a byte-aligned window, would draw (differentiable). With both: the measured
    S, carrying the expected form's gradient."""
    if reference is None:
        reference = builtin_reference()
    elif not isinstance(reference, Reference):
        raise TypeError(f"reference must be a bitlm.reference.Reference, got {type(reference).__name__}")
    _, h_ref = reference.tables()
    measured = None
    if bits is not None and bits.size(1) >= 18:
        values = byte_values(bits)
        measured = symbiosis(reference.surprisal(values)[:, 1:].double().mean(-1) - h_ref).float()
        if not logits.requires_grad:
            return measured
    # Expected: per data-bit prediction, the reference surprisal of the bit drawn from p_t,
    # in the context of the bits before it (without bits: the most likely ones).
    if bits is None:
        bits = torch.cat([logits.new_zeros(logits.size(0), 1, dtype=torch.long), logits[:, :-1].argmax(-1)], 1)
    r = reference.bit_log2_probs(bits, offset)  # (B, T, 2): bit t's distribution
    p = F.softmax(logits.float(), -1)[:, :-1]  # logits[:, t] predicts bit t + 1
    expected = -(p * r[:, 1:]).sum(-1)  # (B, T-1) bits
    phase = (offset + 1 + torch.arange(expected.size(1), device=logits.device)) % 9
    per_byte = expected[:, phase < 8].mean(-1) * 8
    soft = symbiosis(per_byte - h_ref).float()
    return soft if measured is None else measured + soft - soft.detach()


# -- which positions count, and the telemetry of a forward pass --------------------------------


def predicted_phase(length: int, offset: int = 0, causal: bool = True, device=None) -> torch.Tensor:
    """(length,) phase in its byte (0..8) of the bit each logit position predicts."""
    return (offset + int(causal) + torch.arange(length, device=device)) % 9


def data_predictions(logits: torch.Tensor, offset: int = 0, causal: bool = True) -> torch.Tensor:
    """The logits (B, T', 2) that predict data bits: the positions K, C and S count."""
    return logits[:, predicted_phase(logits.size(1), offset, causal, logits.device) < 8]


def data_bits_of(bits: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """The data bits (B, T') of bits (B, T) whose first bit sits ``offset`` bits into the stream."""
    return bits[:, (offset + torch.arange(bits.size(1), device=bits.device)) % 9 < 8]


MAX_LZ_ROWS = 4  # LZ76 costs ~3 ms per 256 bytes: a forward pass measures C on at most 4 rows


def logit_telemetry(
    logits: torch.Tensor,
    bits: torch.Tensor,
    offset: int = 0,
    causal: bool = True,
    grad: tuple[bool, bool, bool] = (False, False, False),
    reference: Reference | None = None,
) -> dict[str, torch.Tensor]:
    """K, C, S (batch means, 0-dim tensors) of a forward pass over ``bits`` (B, T) that gave
    ``logits`` (B, T, 2), by the rule above. ``grad`` says which carry gradients (a regularizer
    is on). C is measured on up to ``MAX_LZ_ROWS`` rows spread over the batch. In denoising
    mode (``causal=False``) the input is noisy: K is the expected form (the predictions' own
    entropy), C and S judge the input."""
    B, T = bits.shape
    rows = np.unique(np.linspace(0, B - 1, min(B, MAX_LZ_ROWS)).round().astype(int))
    # LZ76 parses on the host: only the rows it measures leave the device.
    data = data_bits_of(bits[torch.as_tensor(rows, device=bits.device)], offset).cpu().numpy().astype(np.uint8)
    c = torch.tensor([lz_complexity(row) if data.shape[1] >= 2 else 1.0 for row in data], device=logits.device)
    lz_rate = float(np.mean([lz_code_rate(row) if data.shape[1] >= 2 else 1.0 for row in data]))
    c = c.mean()
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad[0]):
        if causal and T > 1:
            targets = bits[:, 1:]
            keep = predicted_phase(T - 1, offset, True, bits.device) < 8
            k = negentropy_logits(logits[:, :-1][:, keep], targets[:, keep]) if keep.any() else logits.new_ones(B)
        else:
            k = negentropy_logits(data_predictions(logits, offset, causal))
        k = k.mean()
        k = k.detach().clamp_min(1 - lz_rate) + (k - k.detach())  # the shorter code; the model's gradient
    if torch.is_grad_enabled() and grad[1]:
        surrogate = lz_complexity_logits(data_predictions(logits, offset, causal)).mean()
        c = c + surrogate - surrogate.detach()
    aligned = bits if offset % 9 == 0 else None
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad[2]):
        if aligned is not None and causal:
            s = symbiosis_score(logits, reference, aligned).mean()
        elif aligned is not None:
            s = symbiosis_score(logits.detach(), reference, aligned).mean()
        else:
            s = logits.new_tensor(float("nan"))
    return {"negentropy_logits": k, "lz_complexity_logits": c, "symbiosis_score": s}


class RunningTelemetry:
    """K, C, S of a batch of B generations over everything generated so far, updated per byte.

    ``update(bits, logits)`` takes each sequence's new byte (B, 9) and the logits that chose it
    (B, 9, 2) (or, as ``surprisal``, the bits of surprisal (B,) of its data bits under them)
    and returns (K, C, S), lists of B floats, by the formulas above: K from the
    surprisal of the drawn data bits under their logits, C the LZ76 complexity of all data bits
    drawn (parsed incrementally, block by block), S their reference agreement (the byte before the first is
    ``prev``, the prompt's last byte, when given).
    """

    def __init__(self, batch_size: int, reference: Reference | None = None, prev: torch.Tensor | None = None):
        self.reference = reference or builtin_reference()
        self.h_ref = self.reference.tables()[1]
        self.prev = prev.long().view(-1) if prev is not None else torch.full((batch_size,), 256)
        self.n = 0  # bytes per sequence
        self.surprisal = torch.zeros(batch_size, dtype=torch.float64)  # model, data bits
        self.ref_surprisal = torch.zeros(batch_size, dtype=torch.float64)  # reference, bytes
        self.lz = [LZ76() for _ in range(batch_size)]  # the current block's parse (C)
        self.lz_all: list[LZ76] | None = None  # one parse of everything (K's L): the first block's, until it fills
        self.lz_done = [0.0] * batch_size  # phrases of the finished blocks
        self.lz_random_done = 0.0  # a random sequence's, for the same blocks

    def update(
        self, bits: torch.Tensor, logits: torch.Tensor | None = None, surprisal: torch.Tensor | None = None
    ) -> tuple[list[float], list[float], list[float]]:
        bits = bits.detach().cpu().long()
        if surprisal is None:  # from the logits of the 8 data bits
            logp = F.log_softmax(logits.detach().cpu()[:, :8].double(), -1)
            surprisal = -logp.gather(-1, bits[:, :8, None]).squeeze(-1).sum(-1) / math.log(2)
        self.surprisal += surprisal.detach().cpu().double()
        values = byte_values(bits[:, :9])
        self.ref_surprisal += self.reference.surprisal(values, self.prev)[:, 0].double()
        self.prev = values[:, 0]
        self.n += 1
        k_model = 1.0 - (self.surprisal / (8 * self.n)).clamp(0.0, 1.0)
        s = symbiosis(self.ref_surprisal / self.n - self.h_ref)
        c, lz_rate = [], []
        in_block = 8 * self.n - LZ_BLOCK_BITS * (8 * (self.n - 1) // LZ_BLOCK_BITS)
        random_all = lz76_random(8 * self.n)
        for b, row in enumerate(bits[:, :8].numpy().astype(np.uint8)):
            self.lz[b].extend(row)
            if self.lz_all is not None:
                self.lz_all[b].extend(row)
            c.append(min(1.0, (self.lz_done[b] + self.lz[b].count) / (self.lz_random_done + lz76_random(in_block))))
            lz_rate.append(min(1.0, (self.lz_all or self.lz)[b].count / random_all))
        if in_block == LZ_BLOCK_BITS:  # the block is full: the next byte starts a new one
            self.lz_done = [d + lz.count for d, lz in zip(self.lz_done, self.lz)]
            self.lz_random_done += lz76_random(LZ_BLOCK_BITS)
            if self.lz_all is None:  # the first block was everything so far: its parse goes on as the whole's
                self.lz_all = self.lz
            self.lz = [LZ76() for _ in self.lz]
        k = [max(float(km), 1.0 - rate) for km, rate in zip(k_model, lz_rate)]  # the shorter code
        return k, c, s.tolist()


# -- drift -----------------------------------------------------------------------------------


def detect_metric_drift(
    history: Sequence[Mapping[str, float]],
    window: int = 10,
    threshold: float = 0.2,
    metrics: Sequence[str] = ("K", "C", "S"),
) -> bool:
    """True when the newest value of any metric moved more than ``threshold`` away from the
    mean of the up to ``window`` values before it.

    ``history`` is a list of ``{"K": .., "C": .., "S": ..}`` records, oldest first. Fewer than
    two records can show no drift.
    """
    drift = metric_drift(history, window, metrics)
    return any(abs(d) > threshold for d in drift.values())


def metric_drift(
    history: Sequence[Mapping[str, float]],
    window: int = 10,
    metrics: Sequence[str] = ("K", "C", "S"),
) -> dict[str, float]:
    """Per metric: newest value minus the mean of the up to ``window`` values before it."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if len(history) < 2:
        return {}
    newest, before = history[-1], history[-1 - window : -1]
    out = {}
    for m in metrics:
        if m in newest and all(m in h for h in before):
            out[m] = float(newest[m]) - float(np.mean([float(h[m]) for h in before]))
    return out


def telemetry_summary(telemetry: Mapping[str, Any]) -> dict[str, float]:
    """``{"K", "C", "S"}`` floats from a model's telemetry dict (for logs and gates)."""
    keys = {"K": "negentropy_logits", "C": "lz_complexity_logits", "S": "symbiosis_score"}
    return {k: float(torch.as_tensor(telemetry[v]).detach().float().mean()) for k, v in keys.items()}
