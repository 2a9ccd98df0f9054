"""Diffusion mode: the denoising objective, the sampler, and one model in both modes."""

import pytest
import torch

from bitlm import (
    BitTransformerLM,
    SafetyError,
    bits_to_text,
    parity_ok,
    safe_sample_with_retry,
    text_to_bits,
    train_loop,
)
from bitlm.bits import BYTE_BITS
from bitlm.diffusion import corrupt, diffusion_generate

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=144, dropout=0.0)


def _windows(n=48):
    stream = torch.tensor(text_to_bits("abcabcabc denoise me. " * 30))
    return torch.stack([stream[9 * i : 9 * i + 144] for i in range(n)])


def test_corrupt_flips_about_half_the_chosen_fraction():
    bits = torch.zeros(200, 200, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    assert corrupt(bits, 0.0, g).sum() == 0
    flipped = corrupt(bits, 0.6, g).float().mean().item()
    assert abs(flipped - 0.3) < 0.01
    per_row = corrupt(bits, torch.tensor([0.0] * 100 + [1.0] * 100), g).float()
    assert per_row[:100].sum() == 0 and abs(per_row[100:].mean().item() - 0.5) < 0.02


def test_diffusion_mode_is_bidirectional():
    model = BitTransformerLM(**TINY).eval()
    bits = _windows(1)
    flipped = bits.clone()
    flipped[0, 100] ^= 1
    a, b = model(bits, causal=False)[0], model(flipped, causal=False)[0]
    assert not torch.allclose(a[:, :100], b[:, :100])  # earlier positions see the later bit


def test_diffusion_training_lowers_denoising_loss_and_curriculum_lowers_noise():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    h = train_loop(
        model,
        _windows(),
        epochs=12,
        batch_size=8,
        lr=3e-3,
        diffusion=True,
        diffusion_prob=1.0,  # every step denoises
        diffusion_curriculum=True,
        noise_schedule="cosine",
    )
    losses = [r["loss"] for r in h.steps]
    assert sum(losses[-6:]) / 6 < 0.7 * sum(losses[:6]) / 6
    scales = [r["noise_scale"] for r in h.steps]
    assert scales[0] == 1.0 and scales[-1] < 0.35 and scales == sorted(scales, reverse=True)


def test_diffusion_sampler_generates_parity_clean_bytes():
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY)
    train_loop(model, _windows(), epochs=5, batch_size=8, lr=3e-3, diffusion=True)
    prompt = torch.tensor(text_to_bits("abcabc"))
    out, log_q = diffusion_generate(
        model, prompt, 6, steps=4, generator=torch.Generator().manual_seed(0), return_log_q=True
    )
    assert out.shape == (1, 54 + 54) and log_q.shape == (1, 6, 256)
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(1, 6), atol=1e-4)
    assert torch.equal(out[0, :54], prompt)
    assert parity_ok(out).all()


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_denoise_gives_the_byte_distribution_behind_the_bit_marginals(arch):
    """model.denoise is the belief about each clean byte that forward(causal=False) reports
    bit by bit: its marginals are the forward pass's bit probabilities."""
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY, arch=arch).eval()
    noisy = corrupt(_windows(2), 0.5, torch.Generator().manual_seed(1))
    log_q = model.denoise(noisy)
    assert log_q.shape == (2, 16, 256)
    assert torch.allclose(log_q.exp().sum(-1), torch.ones(2, 16), atol=1e-4)
    p_one = torch.softmax(model(noisy, causal=False)[0], -1)[..., 1].view(2, 16, 9)[..., :8]
    byte_bits = BYTE_BITS[:, :8].float()  # (256, 8)
    assert torch.allclose(log_q.exp() @ byte_bits, p_one, atol=1e-4)


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_the_mode_embedding_marks_denoising_windows_only(arch):
    """model.mode_embedding: one learned vector on every position of a denoising window; the
    causal forward pass never reads it."""
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY, arch=arch).eval()
    bits = _windows(2)
    causal, denoise = model(bits)[0], model(bits, causal=False)[0]
    with torch.no_grad():
        model.io.mode_emb.normal_()
    assert torch.equal(model(bits)[0], causal)
    assert not torch.allclose(model(bits, causal=False)[0], denoise)
    assert BitTransformerLM(**TINY, arch=arch, mode_embedding=False).io.mode_emb is None


def test_diffusion_sampling_needs_a_step():
    with pytest.raises(ValueError, match="at least one denoising step"):
        diffusion_generate(BitTransformerLM(**TINY), torch.tensor(text_to_bits("ab")), 4, steps=0)


def test_diffusion_draws_whole_bytes_the_model_believes_in():
    """A denoiser sure the byte is 3, 5 or 6 (a third each): every byte drawn is one of them.
    Drawn bit by bit from the marginals (2/3 for each of the low three bits), 7 would be the
    likeliest byte, one the model gives no mass."""
    model = BitTransformerLM(**TINY, arch="byte_patch").eval()
    with torch.no_grad():
        model.io.byte_head.weight.zero_()
        model.io.byte_head.bias.fill_(-30.0)
        model.io.byte_head.bias[[3, 5, 6]] = 0.0
    out = diffusion_generate(
        model, torch.tensor(text_to_bits("ab")), 12, steps=4, generator=torch.Generator().manual_seed(0)
    )
    drawn = out[0, 18:].view(12, 9)
    values = (drawn[:, :8] * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])).sum(-1)
    assert set(values.tolist()) <= {3, 5, 6} and parity_ok(out).all()


def test_safe_sample_retries_with_diffusion():
    model = BitTransformerLM(**TINY)
    with pytest.raises(ValueError, match="trained to denoise"):  # it never learned to: refused, not noise
        safe_sample_with_retry(model, text_to_bits("hi"), retry_strategy="diffusion", max_new_bytes=8)
    with torch.no_grad():  # always predicts 0, causal or not: every attempt is degenerate
        model.io.head.bias.copy_(torch.tensor([30.0, -30.0]))
        model.io.head.weight.zero_()
    model.trained_modes = {"causal", "denoise"}  # as if it had learned both
    with pytest.raises(SafetyError) as info:
        safe_sample_with_retry(
            model,
            text_to_bits("hi"),
            max_retries=2,
            retry_strategy="diffusion",
            max_new_bytes=8,
            c_floor=0.3,
            s_floor=0.0,
        )
    assert [a["strategy"] for a in info.value.attempts] == ["sample", "diffusion", "diffusion"]
    assert info.value.metrics["C"] < 0.3


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_one_model_learns_both_modes_and_samples_text_in_each(arch):
    """train.diffusion mixes next-bit and denoising micro-batches in one model: the same
    checkpoint continues a prompt causally and by denoising, on both architectures."""
    torch.manual_seed(0)
    model = BitTransformerLM(**TINY, arch=arch, patch_bytes=2 if arch == "byte_patch" else 1)
    h = train_loop(model, _windows(), epochs=40, batch_size=8, lr=3e-3, diffusion=True, diffusion_prob=0.5)
    denoise = [r for r in h.steps if r["denoise"]]
    causal = [r for r in h.steps if not r["denoise"]]
    assert 0.3 < len(denoise) / len(h.steps) < 0.7 and model.trained_modes == {"causal", "denoise"}
    for runs in (denoise, causal):  # both objectives learned
        assert sum(r["loss"] for r in runs[-5:]) < 0.75 * sum(r["loss"] for r in runs[:5])
    alphabet = set("abcdenoism. ")
    prompt = torch.tensor(text_to_bits("abcabcabc "))
    g = torch.Generator().manual_seed(0)
    denoised = diffusion_generate(model, prompt, 12, steps=8, temperature=0.3, generator=g)
    sampled, _ = safe_sample_with_retry(model, prompt, max_new_bytes=12, c_floor=0, s_floor=0, temperature=0.3, seed=0)
    for out in (denoised, sampled):
        text = bits_to_text(out[0, prompt.numel() :], errors="replace")
        assert sum(ch in alphabet for ch in text) >= 7, text  # the training text's letters (noise: ~0.6 of 12)
    assert parity_ok(denoised).all()
