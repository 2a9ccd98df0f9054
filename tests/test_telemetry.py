"""K, C and S with the guide's meanings (bitlm.telemetry, bitlm.reference), on constructed cases."""

import random
import string

import numpy as np
import pytest
import torch
from conftest import TINY

from bitlm import (
    BitTransformerLM,
    builtin_split,
    bytes_to_bits,
    detect_metric_drift,
    lz_code_rate,
    lz_complexity,
    lz_complexity_logits,
    negentropy,
    negentropy_logits,
    symbiosis_score,
    text_to_bits,
    train_loop,
)
from bitlm.reference import Reference, builtin_reference, byte_values
from bitlm.telemetry import LZ76, RunningTelemetry, logit_telemetry, lz76_count, lz76_random

RNG = np.random.default_rng(0)
RANDOM = RNG.integers(0, 2, 4096)
CONSTANT = np.zeros(4096, dtype=int)
PERIODIC = np.tile([0, 1, 1, 0, 1], 820)
_, VAL = builtin_split()


def _logits_for(p1: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, 2) whose P(bit = 1) is p1 (B, T)."""
    return torch.stack([torch.log1p(-p1), torch.log(p1)], dim=-1)


def _kinds(length: int = 128) -> dict[str, bytes]:
    """One text of each kind the gate must tell apart."""
    rnd = random.Random(0)
    return {
        "text": VAL[2000 : 2000 + length],
        "random bytes": bytes(RNG.integers(0, 256, length).astype(np.uint8)),
        "one byte repeated": b"e" * length,
        "phrase looped": (b"the cat sat. " * 40)[:length],
        "random letters": "".join(rnd.choice(string.ascii_lowercase + " ") for _ in range(length)).encode(),
    }


def _bits(data: bytes) -> torch.Tensor:
    return torch.from_numpy(bytes_to_bits(data)).long()[None]


def test_negentropy_of_bits():
    assert negentropy(CONSTANT) == 1.0
    assert negentropy(RANDOM) < 0.01
    assert negentropy([0, 1] * 50) == pytest.approx(0.0)


def test_lz76_count_matches_known_values_and_parses_incrementally():
    # Kaspar & Schuster's worked example: 0 | 001 | 10 | 100 | 1000 | 101 -> 6 phrases
    assert lz76_count([int(c) for c in "0001101001000101"]) == 6
    assert lz76_count([0] * 100) == 2  # "0" then "000...0"
    assert lz76_count([1]) == 1
    seq = RNG.integers(0, 2, 3000)
    counter = LZ76()
    for i in range(0, 3000, 9):  # a byte's bits at a time, as generation feeds it
        counter.extend(seq[i : i + 9])
        assert counter.count == lz76_count(seq[: i + 9])


def test_random_phrase_counts_match_the_table():
    for n in (100, 700, 3000):
        measured = np.mean([lz76_count(RNG.integers(0, 2, n)) for _ in range(40)])
        assert measured == pytest.approx(lz76_random(n), rel=0.03), n


def test_lz_complexity_is_near_one_for_noise_at_any_length_and_low_for_repetition():
    for n in (64, 512, 4096):
        assert 0.9 < np.mean([lz_complexity(RNG.integers(0, 2, n)) for _ in range(10)]) <= 1.0
    c_const, c_per = lz_complexity(CONSTANT), lz_complexity(PERIODIC)
    assert c_const < 0.03 and c_per < 0.05  # (per 1024-bit block: a constant block is 2 phrases)


def test_negentropy_logits_realized_and_expected():
    certain = _logits_for(torch.full((2, 64), 1 - 1e-6))
    coin = _logits_for(torch.full((2, 64), 0.5))
    assert torch.allclose(negentropy_logits(certain), torch.ones(2), atol=1e-3)
    assert torch.allclose(negentropy_logits(coin), torch.zeros(2), atol=1e-6)
    ones, zeros = torch.ones(2, 64, dtype=torch.long), torch.zeros(2, 64, dtype=torch.long)
    assert torch.allclose(negentropy_logits(certain, ones), torch.ones(2), atol=1e-3)  # predicted: no surprise
    assert torch.allclose(negentropy_logits(certain, zeros), torch.zeros(2))  # confidently wrong: noise to it


def test_lz_proxy_low_for_periodic_high_for_coin():
    periodic = torch.tensor([[0.999, 0.001] * 64])
    coin = torch.full((1, 128), 0.5)
    constant = torch.full((1, 128), 0.999)
    assert lz_complexity_logits(_logits_for(periodic)).item() < 0.05
    assert lz_complexity_logits(_logits_for(constant)).item() < 0.05
    assert lz_complexity_logits(_logits_for(coin)).item() == pytest.approx(1.0, abs=1e-4)


def test_proxies_are_differentiable():
    logits = torch.randn(2, 36, 2, requires_grad=True)
    (negentropy_logits(logits).sum() + lz_complexity_logits(logits).sum() + symbiosis_score(logits).sum()).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_reference_tables_and_chain_rule():
    ref = builtin_reference()
    table, h_ref = ref.tables()
    assert 3.0 < h_ref < 4.0 and torch.allclose(torch.exp2(-table).sum(1), torch.ones(257), atol=1e-4)
    bits = _bits(b"The return statement")
    logp = ref.bit_log2_probs(bits)
    realized = -logp[0, torch.arange(bits.size(1)), bits[0]].view(-1, 9)[:, :8].sum(-1)
    assert torch.allclose(realized, ref.surprisal(byte_values(bits))[0], atol=1e-3)  # bits' costs add up to the byte's
    empty = Reference()
    assert empty.recorded_bytes == 0 and empty.tables()[1] == pytest.approx(h_ref)  # falls back to the built-in corpus
    empty.observe(bits)
    assert empty.recorded_bytes == 20 and int(empty.counts[:256].sum()) == 19


def test_s_is_high_in_domain_low_off_distribution_and_ignores_confidence():
    kinds = _kinds()
    s = {k: symbiosis_score(_logits_for(torch.full((1, 9 * 128), 0.5)), bits=_bits(v)).item() for k, v in kinds.items()}
    assert s["text"] > 0.7 and s["phrase looped"] > 0.5  # in-domain bytes (repetition is C's job)
    assert s["random letters"] < 0.2 and s["random bytes"] < 0.05 and s["one byte repeated"] < 0.5
    confident = _logits_for(torch.full((1, 9 * 128), 1 - 1e-6))
    assert symbiosis_score(confident, bits=_bits(kinds["text"])).item() == pytest.approx(s["text"])
    # a reference recorded from other data judges by that data instead
    code = Reference()
    code.observe(_bits(b"def f(x):\n    return x + 1\n" * 30))
    assert symbiosis_score(confident, code, _bits(kinds["text"])).item() < s["text"]


def test_c_orders_the_kinds():
    c = {k: lz_complexity(_bits(v).view(-1, 9)[:, :8].reshape(-1)) for k, v in _kinds().items()}
    assert c["random bytes"] > 0.9 > c["random letters"] > c["text"] > 0.4
    assert c["phrase looped"] < 0.2 and c["one byte repeated"] < 0.1


def test_k_reads_one_parse_of_the_whole_text_so_a_longer_loop_is_more_repetitive():
    """C parses 128-byte blocks and stays put as a loop runs on; K's LZ term is one parse of all
    of it, which a repetition's every further period costs almost nothing."""
    model = BitTransformerLM(**{**TINY, "max_seq_len": 9 * 256}).eval()  # untrained: its own code is ~1 bit per bit
    loops = {n: (b"lambda x: " * 30)[:n] for n in (64, 128, 240)}
    data = {n: _bits(t).view(-1, 9)[:, :8].reshape(-1) for n, t in loops.items()}
    rates = [lz_code_rate(data[n]) for n in (64, 128, 240)]
    assert rates[0] > rates[1] > rates[2] and rates[2] < 0.6 * lz_complexity(data[240])
    with torch.no_grad():
        k = {n: model(_bits(t))[1]["negentropy_logits"].item() for n, t in loops.items()}
    assert k[64] < k[128] < k[240] and k[240] > 0.9 and k[240] == pytest.approx(1 - rates[2], abs=1e-6)
    text = VAL[3000:3240]
    with torch.no_grad():
        k_text = model(_bits(text))[1]["negentropy_logits"].item()
    assert k_text < 0.5  # text an untrained model knows nothing of: only its LZ parse codes it, poorly


def test_k_orders_noise_text_repetition_for_a_trained_model():
    torch.manual_seed(0)
    model = BitTransformerLM(**{**TINY, "max_seq_len": 9 * 64})
    stream = torch.tensor(text_to_bits("the cat sat on the mat. " * 40))
    train_loop(
        model, torch.stack([stream[9 * i : 9 * i + 9 * 64] for i in range(64)]), epochs=12, batch_size=8, lr=3e-3
    )
    model.eval()

    def k(data: bytes) -> float:
        with torch.no_grad():
            return model(_bits(data[:64]))[1]["negentropy_logits"].item()

    noise = bytes(RNG.integers(0, 256, 64).astype(np.uint8))
    assert k(noise) < 0.1 < k(b"a mat sat on the cat, the rat ate the hat. " * 2) < k(b"the cat sat on the mat. " * 3)
    assert k(b"the cat sat on the mat. " * 3) > 0.8


def test_forward_and_running_telemetry_agree_on_a_text():
    model = BitTransformerLM(**{**TINY, "max_seq_len": 9 * 200}).eval()
    bits = _bits(VAL[5000:5200])  # past one LZ block: C's blocks and K's one parse differ
    with torch.no_grad():
        logits, tel = model(bits)
    running = RunningTelemetry(1, model.reference, prev=byte_values(bits[:, :9])[:, 0])
    # feed bytes 1.. with the logits that predicted them (logits[t] predicts bit t + 1)
    shifted = torch.cat([logits[:, :-1], logits[:, -1:]], 1)
    for i in range(1, 200):
        k, c, s = running.update(bits[:, 9 * i : 9 * i + 9], shifted[:, 9 * i - 1 : 9 * i + 8])
    direct = logit_telemetry(logits, bits)
    assert s[0] == pytest.approx(direct["symbiosis_score"].item(), rel=1e-4)
    generated = bits.view(-1, 9)[1:, :8].reshape(-1)
    assert c[0] == pytest.approx(lz_complexity(generated), rel=1e-6)
    assert k[0] == pytest.approx(1 - lz_code_rate(generated), rel=1e-6)  # an untrained model's code is the longer


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
