"""bitlm.trainer and bitlm.optim: one optimizer step (schedule, accumulation, clipping, amp)."""

import pytest
import torch
from conftest import TINY, learnable_windows

from bitlm import BitTransformerLM, TrainConfig, configure_optimizer
from bitlm.trainer import Trainer, clip_gradients, lr_at


def _pair():
    torch.manual_seed(0)
    a = BitTransformerLM(**TINY)
    b = BitTransformerLM(**TINY)
    b.load_state_dict(a.state_dict())
    return a, b


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
    data = learnable_windows(16)
    a = BitTransformerLM(**TINY)
    b = BitTransformerLM(**TINY)
    b.load_state_dict(a.state_dict())
    ta = Trainer(a, TrainConfig(lr=1e-2, grad_clip=0.0))
    tb = Trainer(b, TrainConfig(lr=1e-2, grad_clip=0.0))
    ta.train_step([data])
    tb.train_step([data[:8], data[8:]])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_clipping_bounds_the_update_by_the_global_norm():
    data = learnable_windows(8)
    a, b = _pair()
    Trainer(a, TrainConfig(lr=1e-2, grad_clip=0.0)).train_step([data])
    record = Trainer(b, TrainConfig(lr=1e-2, grad_clip=1e-3)).train_step([data])
    assert record["grad_norm"] > 1e-3  # measured before clipping
    assert any(not torch.allclose(pa, pb) for pa, pb in zip(a.parameters(), b.parameters()))
    model = BitTransformerLM(**TINY)
    model(data)[0].sum().backward()
    norm = clip_gradients(list(model.parameters()), 0.5)
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert norm > 0.5 and after == pytest.approx(0.5, rel=1e-4)


def test_amp_changes_the_arithmetic_but_not_the_step():
    data = learnable_windows(8)
    a, b = _pair()
    ra = Trainer(a, TrainConfig(lr=1e-3)).train_step([data])
    rb = Trainer(b, TrainConfig(lr=1e-3, amp=True)).train_step([data])
    assert ra["loss"] != rb["loss"] and rb["loss"] == pytest.approx(ra["loss"], rel=0.05)


def test_state_dict_resumes_the_same_steps():
    data = learnable_windows(16)
    cfg = TrainConfig(lr=1e-2, compress_prob=0.5, direct_prob=0.5)
    a, b = _pair()
    ta = Trainer(a, cfg)
    records_a = [ta.train_step([d]) for d in (data[:8], data[:8], data[8:])]
    tb = Trainer(b, cfg)
    tb.train_step([data[:8]])
    resumed = Trainer(b, cfg)  # a new trainer from the first one's state: the same steps follow
    resumed.load_state_dict(tb.state_dict())
    records_b = [resumed.train_step([d]) for d in (data[:8], data[8:])]
    for ra, rb in zip(records_a[1:], records_b):
        assert (ra["step"], ra["compressed"], ra["direct"]) == (rb["step"], rb["compressed"], rb["direct"])
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_fused_adamw_fuses_the_optimizer_and_trains_as_the_default_does():
    a, b = _pair()
    data = learnable_windows(16)
    fused = Trainer(a, TrainConfig(lr=1e-2, fused_adamw=True))
    plain = Trainer(b, TrainConfig(lr=1e-2))
    assert fused.optimizer.defaults["fused"] is True and all(g["fused"] for g in fused.optimizer.param_groups)
    # Off, torch picks its own kernel: an explicit fused=False would turn the multi-tensor one off too.
    assert plain.optimizer.defaults["fused"] is None and plain.optimizer.defaults["foreach"] is None
    losses = [fused.train_step([data])["loss"]]
    plain.train_step([data])
    for pa, pb in zip(a.parameters(), b.parameters()):  # the same update, by one kernel
        assert torch.allclose(pa, pb, atol=1e-6)
    losses += [fused.train_step([data])["loss"] for _ in range(7)]
    assert losses[-1] < losses[0]


def test_remapped_optimizer_state_steps_a_fused_optimizer():
    from bitlm.optim import optimizer_param_names, remap_optimizer_state

    a, b = _pair()
    data = learnable_windows(8)
    trainer = Trainer(a, TrainConfig(lr=1e-2))
    trainer.train_step([data])
    for fused in (True, False):
        opt = configure_optimizer(b, lr=1e-2, fused=fused)
        carried = remap_optimizer_state(optimizer_param_names(a), trainer.optimizer.state_dict(), b, opt)
        assert carried == len(list(b.parameters()))
        step = next(iter(opt.state.values()))["step"]
        assert step.dtype == torch.float32 and step.device.type == "cpu"  # a fused step reads it where the params are
        Trainer(b, TrainConfig(lr=1e-2), opt).train_step([data])  # the fused kernel takes the carried state
        assert float(next(iter(opt.state.values()))["step"]) == 2
