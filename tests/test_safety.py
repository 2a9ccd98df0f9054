import random
import string

import numpy as np
import pytest
import torch

from bitlm import (
    BitTransformerLM,
    SafetyError,
    SafetyGate,
    builtin_split,
    bytes_to_bits,
    hil_safe_inference,
    safe_sample_with_retry,
    text_to_bits,
)
from bitlm.safety import assess_generation

TINY = dict(d_model=32, nhead=4, num_layers=1, dim_feedforward=64, max_seq_len=512, dropout=0.0)


def test_gate_burn_in_then_ema():
    gate = SafetyGate(c_floor=0.3, s_floor=0.5, decay=0.9, burn_in=2)
    assert not gate.should_trigger(0.1, 0.1)  # burn-in
    assert not gate.should_trigger(0.1, 0.1)
    assert gate.should_trigger(0.1, 0.1)
    assert gate.failed_metrics().keys() == {"C", "S"}


def test_gate_ema_smooths_single_dips():
    gate = SafetyGate(c_floor=0.3, s_floor=0.5, decay=0.9, burn_in=0)
    for _ in range(5):
        assert not gate.should_trigger(0.8, 0.9)
    assert not gate.should_trigger(0.0, 0.9)  # one bad value: EMA 0.72
    for _ in range(30):
        triggered = gate.should_trigger(0.0, 0.9)
    assert triggered and gate.ema_c < 0.3


def test_gate_rejects_bad_settings():
    with pytest.raises(ValueError):
        SafetyGate(decay=1.5)


def test_hil_safe_inference_passes_and_blocks():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    bits = torch.tensor(text_to_bits("Hello, world!")).unsqueeze(0)
    out, tel = hil_safe_inference(model, bits, c_floor=0.0, s_floor=0.0)
    assert out.shape == bits.shape
    with pytest.raises(SafetyError) as info:
        hil_safe_inference(model, bits, c_floor=1.01, s_floor=0.0, strict=True)
    assert "C=" in str(info.value) and "C" in info.value.metrics
    with pytest.warns(UserWarning, match="blocked"):
        hil_safe_inference(model, bits, c_floor=1.01, s_floor=0.0, strict=False)


def _degenerate_model():
    """A model that always predicts bit 0 with certainty: its text is a run of NUL bytes."""
    model = BitTransformerLM(**TINY)
    with torch.no_grad():
        model.io.head.weight.zero_()
        model.io.head.bias.copy_(torch.tensor([20.0, -20.0]))
    return model


def test_degenerate_output_is_blocked_after_retries():
    model = _degenerate_model()
    with pytest.raises(SafetyError, match="C=.*after 3 attempts"):
        safe_sample_with_retry(model, text_to_bits("hi"), max_retries=2, max_new_bytes=32, c_floor=0.3, s_floor=0.0)


_RND = random.Random(0)
KINDS = {
    "held-out text": (builtin_split()[1][3000:3128], set()),
    "random bytes": (bytes(np.random.default_rng(0).integers(0, 256, 128).astype(np.uint8)), {"S"}),
    "one byte repeated": (b"=" * 128, {"C"}),  # "==" is common in the reference (tables): C blocks it
    "a short phrase looped": ((b"see the map. " * 12)[:128], {"C"}),
    "random letters and spaces": (
        "".join(_RND.choice(string.ascii_lowercase + " ") for _ in range(128)).encode(),
        {"S"},
    ),
}


@pytest.mark.parametrize("kind", KINDS)
def test_gate_at_the_guides_defaults_passes_text_and_blocks_degenerate_output(kind):
    data, fails = KINDS[kind]
    bits = torch.from_numpy(bytes_to_bits(data)).long()
    report = assess_generation(bits, torch.zeros(bits.numel(), 2), c_floor=0.3, s_floor=0.5)
    assert report.passed == (not fails) and set(report.failed) == fails, (kind, report)


def test_an_untrained_models_output_is_blocked_and_says_why():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)  # its bytes are noise to the reference of real text
    with pytest.raises(SafetyError, match="S=") as info:
        safe_sample_with_retry(model, text_to_bits("hi"), max_retries=1, max_new_bytes=32, seed=0)
    assert [a["attempt"] for a in info.value.attempts] == [0, 1] and info.value.metrics["S"] < 0.5


def test_assess_generation_scores_repetition_low():
    rep = torch.tensor(text_to_bits("ab" * 40))
    logits = torch.zeros(rep.numel(), 2)
    report = assess_generation(rep, logits, c_floor=0.3, s_floor=0.0)
    assert not report.passed and report.C < 0.3


def test_each_gated_event_carries_its_own_rows_byte_and_bits():
    """stream_batch's events: per row, the byte its bits spell and the bits the row generated;
    ``as_dict`` is dataclasses.asdict's result and shares no list with the event."""
    import dataclasses

    from bitlm.bits import bits_to_bytes
    from bitlm.gated import GateSettings, stream_batch

    torch.manual_seed(0)
    model = BitTransformerLM(**{**TINY, "max_seq_len": 9 * 64}, arch="byte_patch", patch_bytes=2).eval()
    prompts = [b"abcd", b"Hell", b"x yz"]
    steps = list(stream_batch(model, prompts, [5, 3, 5], [1.0] * 3, [1.0] * 3, [1, 2, 3], GateSettings().open()))
    for b, prompt in enumerate(prompts):
        events = [step[b] for step in steps if step[b] is not None]
        assert len(events) == [5, 3, 5][b] and [e.index for e in events] == list(range(len(events)))
        assert all(bytes([e.byte]) == bits_to_bytes(e.bits) for e in events)
        alone = [
            e for (e,) in stream_batch(model, [prompt], [len(events)], [1.0], [1.0], [b + 1], GateSettings().open())
        ]
        assert [(e.byte, e.bits) for e in alone] == [(e.byte, e.bits) for e in events]  # its row, not another's
    event = steps[0][0]
    d = event.as_dict()
    assert d == dataclasses.asdict(event)
    d["bits"].append(1)
    d["failed"]["C"] = 0.0
    assert len(event.bits) == 9 and event.failed == {}
