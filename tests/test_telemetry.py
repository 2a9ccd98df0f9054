import math

import numpy as np
import pytest
import torch

from bitlm import (
    detect_metric_drift,
    lz_complexity,
    lz_complexity_logits,
    negentropy,
    negentropy_logits,
    symbiosis_score,
)
from bitlm.telemetry import lz76_count

RNG = np.random.default_rng(0)
RANDOM = RNG.integers(0, 2, 4096)
CONSTANT = np.zeros(4096, dtype=int)
PERIODIC = np.tile([0, 1, 1, 0, 1], 820)


def _logits_for(p1: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, 2) whose P(bit = 1) is p1 (B, T)."""
    return torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1)


def test_negentropy_of_bits():
    assert negentropy(CONSTANT) == 1.0
    assert negentropy(RANDOM) < 0.01
    assert negentropy([0, 1] * 50) == pytest.approx(0.0)


def test_lz76_count_matches_known_values():
    # Kaspar & Schuster's worked example: 0 | 001 | 10 | 100 | 1000 | 101 -> 6 phrases
    assert lz76_count([int(c) for c in "0001101001000101"]) == 6
    assert lz76_count([0] * 100) == 2  # "0" then "000...0"
    assert lz76_count([1]) == 1


def test_lz_complexity_orders_sequences():
    c_const, c_per, c_rand = (lz_complexity(s) for s in (CONSTANT, PERIODIC, RANDOM))
    assert c_const < 0.01 and c_per < 0.05
    assert c_rand > 0.85
    assert all(0.0 <= c <= 1.0 for c in (c_const, c_per, c_rand))


def test_negentropy_logits_range_and_extremes():
    certain = _logits_for(torch.full((2, 64), 1 - 1e-6))
    coin = _logits_for(torch.full((2, 64), 0.5))
    assert torch.allclose(negentropy_logits(certain), torch.ones(2), atol=1e-3)
    assert torch.allclose(negentropy_logits(coin), torch.zeros(2), atol=1e-6)


def test_lz_proxy_low_for_periodic_high_for_coin():
    periodic = torch.tensor([[0.999, 0.001] * 64])
    coin = torch.full((1, 128), 0.5)
    constant = torch.full((1, 128), 0.999)
    assert lz_complexity_logits(_logits_for(periodic)).item() < 0.05
    assert lz_complexity_logits(_logits_for(constant)).item() < 0.05
    assert lz_complexity_logits(_logits_for(coin)).item() == pytest.approx(1.0, abs=1e-4)


def test_lz_proxy_on_hard_bits_estimates_entropy_rate():
    rand = torch.from_numpy(RANDOM[:2000]).float().clamp(1e-6, 1 - 1e-6)[None]
    assert lz_complexity_logits(_logits_for(rand)).item() > 0.95


def test_proxies_are_differentiable():
    logits = torch.randn(2, 32, 2, requires_grad=True)
    (negentropy_logits(logits).sum() + lz_complexity_logits(logits).sum() + symbiosis_score(logits).sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_symbiosis_is_one_when_prediction_matches_reference():
    p1 = torch.full((1, 50), 0.3)
    ref = torch.tensor([0.7, 0.3])
    assert symbiosis_score(_logits_for(p1), reference=ref).item() == pytest.approx(1.0, abs=1e-6)
    far = symbiosis_score(_logits_for(torch.full((1, 50), 0.99)), reference=ref).item()
    assert 0.0 < far < 0.2
    # reference from bits: empirical distribution of the sequence
    bits = torch.tensor([[1, 0, 0, 0] * 10])
    s = symbiosis_score(_logits_for(torch.full((1, 40), 0.25)), bits=bits)
    assert s.item() == pytest.approx(1.0, abs=1e-6)


def test_symbiosis_matches_formula():
    p1 = torch.tensor([[0.2, 0.6]])
    q = torch.tensor([0.5, 0.5])
    kl = [sum(qc * math.log(qc / pc) for qc, pc in zip((0.5, 0.5), (1 - p, p))) for p in (0.2, 0.6)]
    expected = math.exp(-sum(kl) / 2)
    assert symbiosis_score(_logits_for(p1), reference=q).item() == pytest.approx(expected, rel=1e-5)


def test_detect_metric_drift_guide_example():
    history = [
        {"K": 0.5, "C": 0.6, "S": 0.7},
        {"K": 0.52, "C": 0.58, "S": 0.69},
        {"K": 0.8, "C": 0.9, "S": 0.4},
    ]
    assert detect_metric_drift(history, window=10, threshold=0.2)
    assert not detect_metric_drift(history[:2], window=10, threshold=0.2)
    assert not detect_metric_drift(history[:1])
    stable = [{"K": 0.5 + 0.01 * (i % 2), "C": 0.6, "S": 0.7} for i in range(30)]
    assert not detect_metric_drift(stable, window=5, threshold=0.05)
