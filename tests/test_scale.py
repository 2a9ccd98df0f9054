import pytest
import torch

from bitlm import BitTransformerLM, TrainConfig, Trainer, evaluate, text_to_bits, train_loop
from bitlm.scale import expand_model, expand_optimizer

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=90, dropout=0.0)
VARIANTS = [{}, {"reversible": True}, {"bit_embedding": "plain"}, {"chunk_size": 18}]


def _windows(n=32, length=90):
    stream = torch.tensor(text_to_bits("grow the model, keep the function. " * 12))
    return torch.stack([stream[9 * i : 9 * i + length] for i in range(n)])


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: ",".join(v) or "default")
@pytest.mark.parametrize("strategy", ["depth", "width", "context"])
def test_expansion_preserves_the_function(strategy, variant):
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY, **variant).eval()
    grown = expand_model(model, strategy).eval()
    bits = _windows(4)
    assert torch.allclose(model(bits)[0], grown(bits)[0], atol=1e-5)
    assert grown.num_parameters() > model.num_parameters()
    expected = {"depth": ("num_layers", 4), "width": ("d_model", 64), "context": ("max_seq_len", 180)}[strategy]
    assert getattr(grown.config, expected[0]) == expected[1]


def test_context_expansion_accepts_longer_inputs():
    model = BitTransformerLM(**TINY).eval()
    grown = expand_model(model, "context")
    assert grown(_windows(2, 180))[0].shape == (2, 180, 2)


@pytest.mark.parametrize("strategy", ["depth", "width", "context"])
def test_training_continues_after_expansion_with_optimizer_state(strategy):
    torch.manual_seed(0)
    data = _windows()
    model = BitTransformerLM(**TINY)
    trainer = Trainer(model, TrainConfig(lr=3e-3))
    for i in range(15):
        trainer.train_step([data[(i % 4) * 8 : (i % 4 + 1) * 8]])
    grown = expand_model(model, strategy)
    opt = expand_optimizer(trainer.optimizer, model, grown)
    carried = sum(p in opt.state for p in grown.parameters())
    old = dict(model.named_parameters())
    unchanged = sum(1 for n, p in grown.named_parameters() if n in old and old[n].shape == p.shape)
    assert carried == unchanged > 0  # unchanged parameters keep their Adam state, others start fresh
    if strategy == "width":
        assert unchanged == 1  # only the 2-way head's bias keeps its shape
    before = evaluate(grown, data, 8)["val_loss"]
    t2 = Trainer(grown, TrainConfig(lr=3e-3), opt)
    for i in range(30):
        t2.train_step([data[(i % 4) * 8 : (i % 4 + 1) * 8]])
    after = evaluate(t2.model, data, 8)["val_loss"]
    assert after < before


def test_width_copies_diverge_during_training():
    torch.manual_seed(0)
    grown = expand_model(BitTransformerLM(**TINY), "width")
    t = Trainer(grown, TrainConfig(lr=3e-3))
    for _ in range(5):
        t.train_step([_windows(8)])
    w = grown.blocks[0].mlp.fc.weight
    assert not torch.allclose(w[:64], w[64:])  # duplicated hidden units no longer identical


def test_train_loop_grows_on_plateau_and_records_it():
    torch.manual_seed(0)
    data = _windows()
    model = BitTransformerLM(**TINY)
    h = train_loop(
        model,
        data,
        epochs=12,
        batch_size=8,
        lr=3e-3,
        val_data=data[:8],
        eval_every=4,
        scale_patience=1,
        scale_min_delta=10.0,
        scale_strategies=["depth", "width"],
        scale_max_params=10**6,
    )
    strategies = [e["strategy"] for e in h.expansions]
    assert strategies[:2] == ["depth", "width"]
    for e in h.expansions:
        assert e["params_after"] > e["params_before"]
        assert e["val_loss_after"] == pytest.approx(e["val_loss_before"], abs=1e-4)
    assert h.model is not model and h.model.config.num_layers >= 4
    assert h.steps[-1]["params"] == h.model.num_parameters()


def test_train_loop_rewarms_the_learning_rate_after_a_growth():
    torch.manual_seed(0)
    data = _windows()
    kw = dict(epochs=4, batch_size=8, lr=3e-3, val_data=data[:8], eval_every=4, scale_patience=1)
    h = train_loop(BitTransformerLM(**TINY), data, **kw, scale_min_delta=10.0, growth_warmup_steps=4)
    grown_at = h.expansions[0]["step"]
    lrs = [r["lr"] for r in h.steps if grown_at <= r["step"] - 1 < grown_at + 5]
    assert lrs == pytest.approx([7.5e-4, 1.5e-3, 2.25e-3, 3e-3, 3e-3])


def test_rewarming_keeps_a_width_growth_from_undoing_training():
    """Widened weights start with fresh Adam moments; at the full rate their first updates
    (about lr per weight) throw the model far from where it was. The re-warm avoids that."""
    data = _windows()

    def worst_after_growth(growth_warmup_steps: int) -> float:
        torch.manual_seed(0)
        cfg = TrainConfig(lr=5e-3, growth_warmup_steps=growth_warmup_steps)
        model = BitTransformerLM(**{**TINY, "num_layers": 1})
        t = Trainer(model, cfg)
        for i in range(24):
            t.train_step([data[(i % 4) * 8 : (i % 4 + 1) * 8]])
        grown = expand_model(model, "width", generator=torch.Generator().manual_seed(0))
        step = t.step
        t = Trainer(grown, cfg, expand_optimizer(t.optimizer, model, grown))
        t.step = t.grown_at = step
        losses = []
        for i in range(8):
            t.train_step([data[(i % 4) * 8 : (i % 4 + 1) * 8]])
            losses.append(evaluate(t.model, data, 8)["val_loss"])
        return max(losses)

    assert worst_after_growth(8) < worst_after_growth(0)


def test_size_cap_stops_growth():
    data = _windows()
    model = BitTransformerLM(**TINY)
    h = train_loop(
        model,
        data,
        epochs=6,
        batch_size=8,
        val_data=data[:8],
        eval_every=2,
        scale_patience=1,
        scale_min_delta=10.0,
        scale_max_params=model.num_parameters(),
    )
    assert h.expansions == [] and h.model is model


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="strategy"):
        expand_model(BitTransformerLM(**TINY), "sideways")


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_width_growth_builds_its_constants_on_the_model_device(arch):
    # On the meta device any constant left on the CPU fails the growth as it would on a GPU
    # ("Tensor on device cpu is not on the expected device"), with no GPU to run on.
    model = BitTransformerLM(**TINY, arch=arch).to("meta")
    grown = expand_model(model, "width", noise=0.0)
    assert {p.device.type for p in grown.parameters()} == {"meta"} and grown.config.d_model == 64


def test_width_growth_with_a_cpu_generator_preserves_the_function_and_repeats():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY).eval()
    a = expand_model(model, "width", generator=torch.Generator().manual_seed(1)).eval()
    b = expand_model(model, "width", generator=torch.Generator().manual_seed(1)).eval()
    bits = _windows(4)
    assert torch.allclose(model(bits)[0], a(bits)[0], atol=1e-5)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_expanded_optimizer_keeps_the_fused_kernel():
    model = BitTransformerLM(**TINY)
    trainer = Trainer(model, TrainConfig(lr=3e-3, fused_adamw=True))
    trainer.train_step([_windows(8)])
    grown = expand_model(model, "depth")
    assert expand_optimizer(trainer.optimizer, model, grown).defaults["fused"] is True


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_grow_to_reaches_a_target_that_leaves_settings_to_the_architecture(arch):
    """A config as loaded leaves dropout and ngram_sizes None (the architecture's defaults); a
    built model's config has them set. grow_to compares like with like: growing a checkpointed
    model to its sweep's grown config is depth then width, not 'cannot grow'."""
    from dataclasses import replace

    from bitlm.config import ModelConfig
    from bitlm.scale import grow_to

    loaded = ModelConfig(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=144, arch=arch)
    assert loaded.dropout is None and loaded.ngram_sizes is None
    model = BitTransformerLM(config=loaded)
    target = replace(loaded, num_layers=4, d_model=64, dim_feedforward=128)
    grown, steps = grow_to(model, target, generator=torch.Generator().manual_seed(0))
    assert steps == ["depth", "width"]
    assert grown.config == target.resolved()
    same, none = grow_to(model, loaded)
    assert none == [] and same is model


def test_growing_refuses_a_change_that_is_not_a_size_by_name():
    """grow_to changes depth, width and context; another setting that differs (a checkpoint
    from before model.mode_embedding, resumed by a config that has it) is refused, named."""
    from bitlm.scale import grow_to

    model = BitTransformerLM(**TINY, mode_embedding=False)
    target = BitTransformerLM(**{**TINY, "num_layers": 2 * TINY["num_layers"]}).config
    with pytest.raises(ValueError, match=r"model\.mode_embedding \(False -> True\)"):
        grow_to(model, target)
    grown, steps = grow_to(
        model, BitTransformerLM(**{**TINY, "num_layers": 2 * TINY["num_layers"]}, mode_embedding=False).config
    )
    assert steps == ["depth"] and grown.config.num_layers == 2 * TINY["num_layers"]
