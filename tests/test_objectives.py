"""bitlm.objectives: the one place a batch becomes a loss, and bits per byte."""

import pytest
import torch
from conftest import TINY, learnable_windows

from bitlm import BitTransformerLM, TrainConfig, bits_per_byte, text_to_bits
from bitlm.objectives import BitObjective, compressed_batch, evaluate, next_bit_loss


def _loss(model, cfg, batch, step=0):
    return BitObjective(cfg, model.config)(model, batch, step)


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
    # from_byte=1 scores the second byte only: 8 data bits, 1 parity bit
    assert bits_per_byte(uniform, bits, from_byte=1) == pytest.approx({"bpb": 8.0, "parity_bpb": 1.0})


def test_plain_objective_is_the_next_bit_loss_and_reports_bpb():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    batch = learnable_windows(8)
    loss, stats = _loss(model, TrainConfig(), batch)
    logits, _ = model(batch)
    assert loss.item() == pytest.approx(next_bit_loss(logits, batch).item(), abs=1e-6)
    assert stats["bpb"] == pytest.approx(bits_per_byte(logits, batch)["bpb"], rel=1e-5)
    assert {"K", "C", "S", "loss", "parity_bpb", "seq_bits"} <= stats.keys()


def test_telemetry_is_measured_on_logged_steps_or_when_a_regularizer_needs_it():
    torch.manual_seed(0)
    batch = learnable_windows(8)
    cfg = TrainConfig(log_every=5)
    model = BitTransformerLM(**TINY)
    measured = [s for s in range(12) if {"K", "C", "S"} <= _loss(model, cfg, batch, s)[1].keys()]
    assert measured == [0, 4, 9]  # steps 1, 5 and 10 once done: the ones train_loop logs
    assert "K" not in _loss(model, TrainConfig(log_every=1000), batch, 3)[1]
    regularized = BitTransformerLM(**TINY, lambda_C=0.1)
    assert {"K", "C", "S"} <= _loss(regularized, cfg, batch, 3)[1].keys()


def test_regularizers_change_the_gradient():
    torch.manual_seed(0)
    data = learnable_windows(8)
    grads = []
    for lam in (0.0, 0.5):
        torch.manual_seed(0)
        model = BitTransformerLM(**TINY, lambda_K=lam, lambda_C=lam, lambda_S=lam)
        _loss(model, TrainConfig(lr=0.0), data)[0].backward()
        grads.append(model.io.head.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_compressed_form_is_the_rle_stream_with_a_mask():
    from bitlm.bits import rle_bit_stream

    assert rle_bit_stream([1, 1, 1, 0]).tolist() == [1, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    batch = torch.tensor([[0] * 18, [0, 1] * 9])
    out, mask = compressed_batch(batch)
    assert mask[0].sum() == 9 and out[0, :9].tolist() == [0, 0, 0, 0, 1, 0, 0, 1, 0]  # one run of 18 zeros
    assert mask[1].all()  # 18 runs of 1: the stream is cut to the window


def test_direct_prediction_ignores_parity_positions():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    batch = learnable_windows(8)
    other = batch.clone()
    other[:, 89] ^= 1  # the last bit is a parity target (phase 8) that no later position reads
    direct = TrainConfig(direct_prob=1.0)
    assert _loss(model, direct, batch)[0].item() == pytest.approx(_loss(model, direct, other)[0].item(), abs=1e-6)
    plain = TrainConfig()
    assert _loss(model, plain, batch)[0].item() != pytest.approx(_loss(model, plain, other)[0].item(), abs=1e-6)


def test_denoising_scores_each_position_against_the_clean_bit():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    objective = BitObjective(TrainConfig(diffusion=True), model.config)
    plan = objective.plan(learnable_windows(8), step=0)
    assert not plan.causal and torch.equal(plan.targets, learnable_windows(8))
    assert 0 < (plan.inputs != plan.targets).float().mean() < 0.5  # corrupted, not replaced
    logits, telemetry = model(plan.inputs, causal=False)
    loss, stats = objective.loss(logits, telemetry, plan)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), plan.targets.reshape(-1))
    assert loss.item() == pytest.approx(ce.item(), abs=1e-6) and "noise_scale" in stats and "bpb" not in stats


def test_diffusion_mixes_denoising_into_next_bit_training_on_both_architectures():
    for arch in ("bit", "byte_patch"):
        model = BitTransformerLM(**TINY, arch=arch)
        objective = BitObjective(TrainConfig(diffusion=True, diffusion_prob=0.5), model.config)
        plans = [objective.plan(learnable_windows(4), step) for step in range(40)]
        assert 10 < sum(not p.causal for p in plans) < 30
        loss, stats = objective(model, learnable_windows(4), 0)
        assert torch.isfinite(loss)


def test_draws_follow_the_generator_so_a_resumed_run_repeats_them():
    cfg = TrainConfig(compress_prob=0.5, direct_prob=0.5)
    model = BitTransformerLM(**TINY)
    batch = learnable_windows(4)
    a = BitObjective(cfg, model.config, generator=torch.Generator().manual_seed(3))
    first = [a.plan(batch, s).stats for s in range(10)]
    b = BitObjective(cfg, model.config, generator=torch.Generator().manual_seed(3))
    assert [b.plan(batch, s).stats for s in range(10)] == first
    assert 0 < sum(s["compressed"] for s in first) < 10


def test_evaluate_matches_bits_per_byte_and_spreads_partial_evaluations():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY).eval()
    data = learnable_windows(12)
    out = evaluate(model, data, batch_size=5)
    logits, _ = model(data)
    assert out["val_bpb"] == pytest.approx(bits_per_byte(logits, data)["bpb"], rel=1e-5)
    assert out["val_loss"] == pytest.approx(next_bit_loss(logits, data).item(), rel=1e-5)
    with pytest.raises(ValueError, match="no validation windows"):
        evaluate(model, data[:0])


def test_the_objective_draws_on_a_cpu_generator_and_noise_on_the_batch_device(monkeypatch):
    import types

    from bitlm import objectives
    from bitlm.torch_utils import GeneratorDeviceError

    cfg = TrainConfig(diffusion=True, diffusion_prob=1.0)
    model_cfg = BitTransformerLM(**TINY).config
    with pytest.raises(GeneratorDeviceError, match="CPU generator"):
        BitObjective(cfg, model_cfg, generator=types.SimpleNamespace(device=torch.device("cuda", 0)))
    objective = BitObjective(cfg, model_cfg)
    with pytest.raises(GeneratorDeviceError, match="BitObjective"):  # as a Trainer hands its own over
        objective.generator = types.SimpleNamespace(device=torch.device("cuda", 0))
    used, real = [], objectives.corrupt

    def corrupt(bits, level, generator):
        used.append((bits.device, level.device, generator))
        return real(bits, level, generator)

    monkeypatch.setattr(objectives, "corrupt", corrupt)
    batch = learnable_windows(4)
    objective.plan(batch, 0)
    ((bits_device, level_device, noise),) = used
    assert noise is not objective.generator and noise.device == bits_device == level_device == batch.device
