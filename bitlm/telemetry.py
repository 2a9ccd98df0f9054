"""K / C / S telemetry: the three numbers, each in [0, 1], that bitlm reports and gates on.

Each metric has one measurement form (on a concrete bit sequence) and one differentiable form
(on the model's next-bit logits, usable as a regularizer). Both are defined here and only here.

K, negentropy -- how far a distribution is from a fair coin::

    K = 1 - H / log(2),   H = -sum_c p_c log p_c   (binary entropy in nats)

  measured on bits: p = fraction of ones in the sequence; on logits: the mean over positions of
  1 - H(softmax(logits_t)) / log 2. ~0 for fair coin flips, 1 for a constant sequence.

C, LZ complexity -- how much new structure a sequence keeps producing::

    C = c_LZ76(s) * log2(n) / n            (exact, on bits; clipped to [0, 1])

  where c_LZ76 is the Lempel-Ziv (1976) phrase count of the n-bit sequence s; for random bits
  C -> 1, for repetitive bits C -> 0. Its differentiable proxy on logits is the order-k
  conditional entropy rate of the predicted bit stream (k = 2), in bits::

    C_proxy = H(X_t, ..., X_{t-k}) - H(X_{t-1}, ..., X_{t-k})

  with the (k+1)-gram distribution estimated softly as the mean over positions of the product
  of predicted bit probabilities. Constant or periodic predictions give ~0, fair coins 1.

S, symbiosis -- agreement of the model's predictive distribution with a reference::

    S = exp(-mean_t KL(q || p_t))

  where p_t = softmax(logits_t) and q is the reference distribution over {0, 1}: by default the
  empirical bit distribution of the input sequence. 1 when predictions match the reference.

Which positions count (the one rule; the model, the objectives, generation, the gate and the
servers all take it from here): K, C and S count the model's predictions of *data* bits only.
A parity bit is a function of the 8 data bits before it (the codec sets it, generation never
samples it), so its prediction says nothing about what the model believes of the text; for
``arch="byte_patch"`` it is fixed by construction and would pin K near 1. The reference of S
is the distribution of the data bits in the same sequence. A next-bit logit at position t
predicts bit ``offset + t + 1`` (``offset + t`` in diffusion mode), whose phase within its
byte decides whether it counts (phases 0..7: data; 8: parity).

During generation (:class:`RunningTelemetry`) each byte gets K and S of its own data-bit
predictions (S against the distribution of the data bits generated so far) and C of all data
bits generated so far; the whole generation's three numbers count all of its predictions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .bits import _as_numpy_bits

_EPS = 1e-9


# -- K: negentropy ----------------------------------------------------------------------------


def negentropy(bits: Any) -> float:
    """K of a concrete bit sequence: 1 - binary entropy of its fraction of ones."""
    arr = _as_numpy_bits(bits).reshape(-1)
    if arr.size == 0:
        raise ValueError("negentropy of an empty bit sequence is undefined")
    p = float(arr.mean())
    h = -sum(x * math.log2(x) for x in (p, 1 - p) if x > 0)
    return 1.0 - h


def negentropy_logits(logits: torch.Tensor) -> torch.Tensor:
    """K per sequence (B,) from next-bit logits (B, T, 2): mean of 1 - H(p_t) / log 2."""
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)  # (B, T) nats
    return (1.0 - h / math.log(2)).mean(-1).clamp(0.0, 1.0)


# -- C: LZ complexity ------------------------------------------------------------------------


def lz76_count(bits: Any) -> int:
    """Exact Lempel-Ziv (1976) phrase count of a bit sequence (Kaspar & Schuster parsing).

    Each phrase is the shortest substring starting where the last one ended that does not
    occur in the text before its own last symbol. The search runs per phrase (exponential then
    binary search over the phrase length, with C-level substring search), not per bit.
    """
    s = _as_numpy_bits(bits).reshape(-1).tobytes()
    n, i, count = len(s), 0, 0
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
        count += 1
        i += lo + 1
    return count


def lz_complexity(bits: Any) -> float:
    """C of a concrete bit sequence: c_LZ76 * log2(n) / n, clipped to [0, 1]."""
    arr = _as_numpy_bits(bits).reshape(-1)
    n = arr.size
    if n < 2:
        raise ValueError("LZ complexity needs at least 2 bits")
    return min(1.0, lz76_count(arr) * math.log2(n) / n)


def _patterns(order: int, device: torch.device) -> torch.Tensor:
    k1 = order + 1
    idx = torch.arange(2**k1, device=device)
    return ((idx[:, None] >> torch.arange(k1 - 1, -1, -1, device=device)) & 1).float()


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log2(p.clamp_min(_EPS))).sum(-1)


def lz_complexity_logits(logits: torch.Tensor, order: int = 2) -> torch.Tensor:
    """Differentiable C per sequence (B,): the soft order-``order`` entropy rate (see module)."""
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


def symbiosis_score(
    logits: torch.Tensor,
    reference: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """S per sequence (B,): exp(-mean_t KL(q || p_t)).

    ``reference`` is q: a (2,), (B, 2) or (B, T, 2) distribution over {0, 1}. When it is
    None, q is the empirical bit distribution of ``bits`` (B, T); with neither, uniform.
    """
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, 2)
    if reference is None:
        if bits is not None:
            p1 = bits.float().mean(-1, keepdim=True)  # (B, 1)
            reference = torch.cat([1 - p1, p1], dim=-1)
        else:
            reference = torch.full((2,), 0.5, device=logits.device)
    q = reference.float().to(logits.device)
    while q.dim() < 3:
        q = q.unsqueeze(-2)
    kl = (q * (torch.log(q.clamp_min(_EPS)) - logp)).sum(-1)  # (B, T)
    return torch.exp(-kl.mean(-1))


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


def logit_telemetry(
    logits: torch.Tensor,
    bits: torch.Tensor,
    offset: int = 0,
    causal: bool = True,
    grad: tuple[bool, bool, bool] = (False, False, False),
) -> dict[str, torch.Tensor]:
    """K, C, S (batch means, 0-dim tensors) of a forward pass over ``bits`` (B, T) that gave
    ``logits`` (B, T, 2), by the rule above. ``grad`` says which of the three carry gradients
    (a regularizer is on); the others are computed without, so logging them costs no memory."""
    counted = data_predictions(logits, offset, causal)
    reference = data_bits_of(bits, offset)
    if counted.size(1) == 0:  # nothing predicted is a data bit (a lone parity position)
        counted, reference = logits, bits
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad[0]):
        k = negentropy_logits(counted).mean()
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad[1]):
        c = lz_complexity_logits(counted).mean()
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad[2]):
        s = symbiosis_score(counted, bits=reference if reference.numel() else None).mean()
    return {"negentropy_logits": k, "lz_complexity_logits": c, "symbiosis_score": s}


class RunningTelemetry:
    """K, C, S of a batch of B generations, updated per generated byte.

    ``update(bits, logits)`` takes each sequence's new byte (B, 9) and the logits that chose it
    (B, 9, 2) and returns the byte's (K, C, S), lists of B floats: K the negentropy of the byte's
    data-bit predictions; S ``exp(-mean_t KL(q || p_t))`` over them, with q the distribution of
    all data bits generated so far; C the LZ76 complexity of all data bits generated so far.
    A gate smooths the per-byte K and S (bitlm.gated.SafetyGate's EMA). ``totals()`` gives the
    same three over everything generated so far (K and S over all data-bit predictions), the
    numbers of the whole generation. S over many predictions is kept from running sums:
    ``mean_t KL(q || p_t) = sum_c q_c log q_c - sum_c q_c mean_t log p_t,c``.
    """

    def __init__(self, batch_size: int):
        self.n = 0  # data-bit predictions per sequence
        self.k_sum = torch.zeros(batch_size, dtype=torch.float64)
        self.logp_sum = torch.zeros(batch_size, 2, dtype=torch.float64)
        self.ones = torch.zeros(batch_size, dtype=torch.float64)
        self.data: list[list[np.ndarray]] = [[] for _ in range(batch_size)]
        self.c: list[float] = [1.0] * batch_size

    @staticmethod
    def _s(q: torch.Tensor, mean_logp: torch.Tensor) -> torch.Tensor:
        kl = (q * torch.log(q.clamp_min(_EPS))).sum(-1) - (q * mean_logp).sum(-1)
        return torch.exp(-kl.clamp_min(0.0))

    def _q(self) -> torch.Tensor:
        p1 = self.ones / max(self.n, 1)
        return torch.stack([1 - p1, p1], -1)

    def update(self, bits: torch.Tensor, logits: torch.Tensor) -> tuple[list[float], list[float], list[float]]:
        logp = F.log_softmax(logits[:, :8].detach().double().cpu(), -1)  # (B, 8, 2) data-bit predictions
        data = bits[:, :8].detach().cpu()
        k = (1.0 + (logp.exp() * logp).sum(-1) / math.log(2)).clamp(0.0, 1.0)  # (B, 8)
        self.n += 8
        self.k_sum += k.sum(-1)
        self.logp_sum += logp.sum(1)
        self.ones += data.sum(-1).double()
        s = self._s(self._q(), logp.mean(1))
        for b, (row, seq) in enumerate(zip(data.numpy().astype(np.uint8), self.data)):
            seq.append(row)
            self.c[b] = lz_complexity(np.concatenate(seq))
        return k.mean(-1).tolist(), list(self.c), s.tolist()

    def totals(self) -> tuple[list[float], list[float], list[float]]:
        n = max(self.n, 1)
        s = self._s(self._q(), self.logp_sum / n)
        return (self.k_sum / n).tolist(), list(self.c), s.tolist()


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
