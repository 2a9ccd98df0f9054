"""bitlm.loop: train_loop, the guide's entry point (budgets, callbacks, objectives drawn, logging)."""

import math

import pytest
import torch
from conftest import TINY, learnable_windows

from bitlm import (
    BitTransformerLM,
    set_dropout,
    train_loop,
)


def test_loss_goes_down_on_learnable_data():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    data = learnable_windows()
    history = train_loop(model, data, epochs=15, batch_size=8, lr=3e-3, val_data=data[:16], eval_every=0)
    first = sum(r["loss"] for r in history.steps[:5]) / 5
    last = sum(r["loss"] for r in history.steps[-5:]) / 5
    assert last < 0.5 * first
    assert history.evals[-1]["val_bpb"] < 4.0
    for r in history.steps:  # K, C, S on the logged steps (the first, every log_every-th: 10)
        assert {"loss", "bpb", "parity_bpb", "lr", "step"} <= r.keys()
        assert ({"K", "C", "S"} <= r.keys()) == (r["step"] == 1 or r["step"] % 10 == 0)
        assert all(0.0 <= r[k] <= 1.0 for k in "KCS" if k in r)


def test_budget_and_callback_stop_training():
    model = BitTransformerLM(**TINY)
    data = learnable_windows(64)
    assert len(train_loop(model, data, epochs=50, batch_size=8, max_steps=7)) == 7
    calls = []
    h = train_loop(model, data, epochs=50, batch_size=8, callback=lambda r: calls.append(r) or len(calls) >= 3)
    assert len(h) == 3


def test_amp_and_dropout_settings():
    model = BitTransformerLM(**dict(TINY, dropout=0.1))
    set_dropout(model, 0.0)
    assert model.config.dropout == 0.0 and all(b.attn.dropout == 0.0 for b in model.blocks)
    h = train_loop(model, learnable_windows(16), epochs=1, batch_size=8, amp=True)
    assert math.isfinite(h.steps[-1]["loss"])


def test_unknown_arguments_are_named():
    with pytest.raises(TypeError, match="lerning_rate"):
        train_loop(BitTransformerLM(**TINY), learnable_windows(8), lerning_rate=1)


def test_compress_and_direct_objectives_are_drawn_and_train():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    h = train_loop(
        model,
        learnable_windows(),
        epochs=8,
        batch_size=8,
        lr=3e-3,
        compress_prob=0.5,
        compress_warmup=10,
        direct_prob=0.3,
    )
    early = [r["compressed"] for r in h.steps[:10]]
    late = [r["compressed"] for r in h.steps[10:]]
    assert sum(early) == 0 and 0.2 < sum(late) / len(late) < 0.8
    assert 0.1 < sum(r["direct"] for r in h.steps) / len(h.steps) < 0.5
    plain = [r for r in h.steps if not r["compressed"] and not r["direct"]]
    assert all("bpb" in r for r in plain) and plain[-1]["loss"] < plain[0]["loss"]


def test_sequence_length_ramp_cuts_windows():
    model = BitTransformerLM(**TINY)
    h = train_loop(model, learnable_windows(), epochs=3, batch_size=8, seq_ramp_start_bytes=3, seq_ramp_steps=10)
    lengths = [r["seq_bits"] for r in h.steps]
    assert lengths[0] == 27 and lengths[-1] == 90 and lengths == sorted(lengths)
