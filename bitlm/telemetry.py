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
