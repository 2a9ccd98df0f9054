import math

import pytest
import torch

from bitlm import (
    BitTransformerLM,
    TrainConfig,
    bits_per_byte,
    configure_optimizer,
    set_dropout,
    text_to_bits,
    train_loop,
)
from bitlm.training import Trainer, lr_at

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=90, dropout=0.0)


def _learnable_windows(n=64):
    """Windows of a short repeated phrase, at every byte offset: easy to learn."""
    bits = torch.tensor(text_to_bits("the cat sat on the mat. " * 20))
    return torch.stack([bits[9 * i : 9 * i + 90] for i in range(n)])


def test_loss_goes_down_on_learnable_data():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    data = _learnable_windows()
    history = train_loop(model, data, epochs=15, batch_size=8, lr=3e-3, val_data=data[:16], eval_every=0)
    first = sum(r["loss"] for r in history.steps[:5]) / 5
    last = sum(r["loss"] for r in history.steps[-5:]) / 5
    assert last < 0.5 * first
    assert history.evals[-1]["val_bpb"] < 4.0
    for r in history.steps:
        assert {"loss", "bpb", "parity_bpb", "K", "C", "S", "lr", "step"} <= r.keys()
        assert all(0.0 <= r[k] <= 1.0 for k in "KCS")


def test_bits_per_byte_counts_data_and_parity_apart():
    bits = torch.tensor([text_to_bits("ab")])
    uniform = torch.zeros(1, 18, 2)
    out = bits_per_byte(uniform, bits)
    # 17 predicted bits: 15 data bits (7 + 8) and 2 parity bits, 1 bit each under uniform
    assert out["bpb"] == pytest.approx(8.0)
    assert out["parity_bpb"] == pytest.approx(1.0)
    perfect = torch.full((1, 18, 2), -30.0)
    perfect[0, torch.arange(17), bits[0, 1:]] = 30.0
    assert bits_per_byte(perfect, bits)["bpb"] == pytest.approx(0.0, abs=1e-6)


def test_optimizer_does_not_decay_norms_biases_embeddings():
    model = BitTransformerLM(**TINY)
    opt = configure_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_ids = {id(p) for p in no_decay["params"]}
    assert id(model.pos_emb.weight) in no_decay_ids
    assert id(model.blocks[0].ln1.weight) in no_decay_ids
    assert id(model.blocks[0].attn.qkv.bias) in no_decay_ids
    assert id(model.blocks[0].attn.qkv.weight) not in no_decay_ids
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.num_parameters()


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, lr_schedule="cosine")
    assert lr_at(0, cfg, 110) == pytest.approx(0.1)
    assert lr_at(9, cfg, 110) == pytest.approx(1.0)
    assert lr_at(60, cfg, 110) == pytest.approx(0.55)
    assert lr_at(110, cfg, 110) == pytest.approx(0.1)


def test_lr_rewarms_after_a_growth():
    cfg = TrainConfig(lr=1.0, growth_warmup_steps=4)
    assert [lr_at(s, cfg, None, grown_at=20) for s in range(20, 26)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])
    assert lr_at(20, TrainConfig(lr=1.0, growth_warmup_steps=0), None, grown_at=20) == 1.0
    cos = TrainConfig(lr=1.0, min_lr=0.0, lr_schedule="cosine", growth_warmup_steps=2)
    assert lr_at(50, cos, 100, grown_at=50) == pytest.approx(0.5 * lr_at(50, cos, 100))  # ramps the schedule's rate


def test_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    data = _learnable_windows(16)
    a = BitTransformerLM(**TINY)
    b = BitTransformerLM(**TINY)
    b.load_state_dict(a.state_dict())
    ta = Trainer(a, TrainConfig(lr=1e-2, grad_clip=0.0))
    tb = Trainer(b, TrainConfig(lr=1e-2, grad_clip=0.0))
    ta.train_step([data])
    tb.train_step([data[:8], data[8:]])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_regularizers_change_the_gradient():
    torch.manual_seed(0)
    data = _learnable_windows(8)
    grads = []
    for lam in (0.0, 0.5):
        torch.manual_seed(0)
        model = BitTransformerLM(**TINY, lambda_K=lam, lambda_C=lam, lambda_S=lam)
        Trainer(model, TrainConfig(lr=0.0))._loss(data)[0].backward()
        grads.append(model.io.head.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_budget_and_callback_stop_training():
    model = BitTransformerLM(**TINY)
    data = _learnable_windows(64)
    assert len(train_loop(model, data, epochs=50, batch_size=8, max_steps=7)) == 7
    calls = []
    h = train_loop(model, data, epochs=50, batch_size=8, callback=lambda r: calls.append(r) or len(calls) >= 3)
    assert len(h) == 3


def test_amp_and_dropout_settings():
    model = BitTransformerLM(**dict(TINY, dropout=0.1))
    set_dropout(model, 0.0)
    assert model.config.dropout == 0.0 and all(b.attn.dropout == 0.0 for b in model.blocks)
    h = train_loop(model, _learnable_windows(16), epochs=1, batch_size=8, amp=True)
    assert math.isfinite(h.steps[-1]["loss"])


def test_unknown_arguments_are_named():
    with pytest.raises(TypeError, match="lerning_rate"):
        train_loop(BitTransformerLM(**TINY), _learnable_windows(8), lerning_rate=1)


def test_compressed_form_is_the_rle_stream_with_a_mask():
    from bitlm.bits import rle_bit_stream
    from bitlm.training import compressed_batch

    assert rle_bit_stream([1, 1, 1, 0]).tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    batch = torch.tensor([[0] * 18, [0, 1] * 9])
    out, mask = compressed_batch(batch)
    assert mask[0].sum() == 9 and out[0, :9].tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 0]  # one run of 18 zeros
    assert mask[1].all()  # 18 runs of 1: the stream is cut to the window


def test_compress_and_direct_objectives_are_drawn_and_train():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    h = train_loop(
        model,
        _learnable_windows(),
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


def test_direct_prediction_ignores_parity_positions():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    batch = _learnable_windows(8)
    other = batch.clone()
    other[:, 89] ^= 1  # the last bit is a parity target (phase 8) that no later position reads
    direct = Trainer(model, TrainConfig(direct_prob=1.0))
    assert direct._loss(batch)[0].item() == pytest.approx(direct._loss(other)[0].item(), abs=1e-6)
    plain = Trainer(model, TrainConfig())
    assert plain._loss(batch)[0].item() != pytest.approx(plain._loss(other)[0].item(), abs=1e-6)


def test_sequence_length_ramp_cuts_windows():
    model = BitTransformerLM(**TINY)
    h = train_loop(model, _learnable_windows(), epochs=3, batch_size=8, seq_ramp_start_bytes=3, seq_ramp_steps=10)
    lengths = [r["seq_bits"] for r in h.steps]
    assert lengths[0] == 27 and lengths[-1] == 90 and lengths == sorted(lengths)
