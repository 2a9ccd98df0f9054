import math

import pytest
import torch

from bitlm import BitTransformerLM, bits_to_text, generate_bits, parity_ok, sample_text, text_to_bits

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=144, dropout=0.0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BitTransformerLM(**TINY)


def test_sample_text_returns_str_of_requested_bytes(model):
    out = sample_text(model, "Hello", max_new_tokens=12, temperature=1.0, seed=3)
    assert isinstance(out, str)
    assert len(out.encode("utf-8", errors="surrogatepass")) >= 1


def test_generated_bits_always_pass_parity(model):
    prompt = torch.tensor(text_to_bits("abc")).unsqueeze(0).repeat(3, 1)
    out = generate_bits(model, prompt, 30, temperature=1.5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 27 + 30 * 9)
    assert parity_ok(out).all()
    assert isinstance(bits_to_text(out, errors="replace")[0], str)


def test_seed_makes_sampling_repeatable(model):
    a = sample_text(model, "seed", 16, temperature=1.0, seed=7)
    b = sample_text(model, "seed", 16, temperature=1.0, seed=7)
    assert a == b


def test_cache_and_no_cache_generate_the_same(model):
    prompt = torch.tensor(text_to_bits("cache me"))
    # the 144-bit context fills up, so this also covers the re-primed window
    a, la = generate_bits(model, prompt, 20, temperature=0, use_cache=True, return_logits=True)
    b, lb = generate_bits(model, prompt, 20, temperature=0, use_cache=False, return_logits=True)
    assert torch.equal(a, b)
    assert torch.allclose(la, lb, atol=1e-4)


def test_greedy_follows_argmax(model):
    prompt = torch.tensor(text_to_bits("x"))
    out, logits = generate_bits(model, prompt, 3, temperature=0, return_logits=True)
    new = out[0, 9:].view(3, 9)
    chosen = logits[0].argmax(-1).view(3, 9)
    assert torch.equal(new[:, :8], chosen[:, :8])


def test_top_p_keeps_only_the_likely_bit():
    from bitlm.generate import sample_bit

    logits = torch.log(torch.tensor([[0.05, 0.95]])).repeat(500, 1)
    drawn = sample_bit(logits, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert drawn.eq(1).all()
    free = sample_bit(logits, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(0))
    assert free.eq(0).any()


def test_empty_prompt_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        sample_text(model, "", 4)


def test_greedy_byte_is_the_bit_by_bit_greedy_path_not_the_likeliest_byte():
    from bitlm.byte_patch import node_logits
    from bitlm.generate import byte_log_probs, greedy_byte

    g = torch.Generator().manual_seed(0)
    log_q = torch.log_softmax(3 * torch.randn(500, 256, generator=g), -1)
    walked = byte_log_probs(node_logits(log_q), 0.0, 1.0).argmax(-1)  # the one byte of probability 1
    assert torch.equal(greedy_byte(log_q), walked)
    # 0x80 alone holds 0.4; the bytes below 0x80 share 0.6: bit 0 wins at the first node
    q = torch.full((256,), 0.6 / 128)
    q[128:] = 0.0
    q[0x80] = 0.4
    assert int(greedy_byte(q.log())) < 0x80 and int(q.argmax()) == 0x80
    # one row at a time, peaked and flat: rows whose top byte holds over half of q take the
    # short way (that byte), the others the walk; both give the walked byte
    peaked = torch.log_softmax(torch.randn(200, 256, generator=g) * torch.linspace(1, 12, 200)[:, None], -1)
    walked = byte_log_probs(node_logits(peaked), 0.0, 1.0).argmax(-1)
    assert 20 < int((peaked.max(-1).values > math.log(0.5)).sum()) < 180
    assert [int(greedy_byte(row[None])) for row in peaked] == walked.tolist()


def test_categorical_draws_follow_each_rows_weights_and_its_own_generator(monkeypatch):
    """The one categorical draw (inverse CDF): frequencies match unnormalized weights, a zero
    weight never comes out (at either extreme of the uniform), bad weights are refused by name,
    and in a batch with one generator per row each row draws what it draws alone."""
    from bitlm.torch_utils import categorical

    w = torch.tensor([[0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 2.0], [1.0, 1.0, 0.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([categorical(w, g) for _ in range(20000)])  # (n, 3)
    freq = torch.stack([torch.bincount(drawn[:, r], minlength=4) for r in range(3)]).float() / len(drawn)
    assert torch.allclose(freq, w / w.sum(-1, keepdim=True), atol=0.015)
    assert not (freq[w == 0] > 0).any()
    for u, weights, expected in ((1 - 2.0**-53, [1.0, 2.0, 0.0], 1), (0.0, [0.0, 0.0, 1.0], 2)):  # the extremes of u
        fixed = lambda B, n, generator, device, dtype=torch.float32, u=u: torch.full((B, n), u, dtype=dtype)  # noqa: E731
        monkeypatch.setattr("bitlm.torch_utils.uniform_rows", fixed)
        assert int(categorical(torch.tensor([weights]), None)) == expected
    monkeypatch.undo()
    for bad in ([0.0, 0.0], [1.0, float("nan")], [-1.0, 2.0], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="non-negative weights"):
            categorical(torch.tensor([[1.0, 1.0], bad]), g)
    seeds = [3, 4, 5]
    together = categorical(w, [torch.Generator().manual_seed(s) for s in seeds])
    alone = [int(categorical(w[r : r + 1], torch.Generator().manual_seed(s))) for r, s in enumerate(seeds)]
    assert together.tolist() == alone


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_generation_records_nothing_for_autograd_and_training_goes_on_after_it(arch):
    """Decoding runs in inference mode: what iter_generate yields are inference tensors (no
    autograd, no version counters), while generate_bits returns an ordinary tensor its caller
    may write into. Nothing decoding leaves behind on the model breaks training: a step of the
    one objective after sampled, greedy (speculative at one byte a patch) and uncached decoding
    still back-propagates into every parameter and changes the loss."""
    from bitlm import iter_generate
    from bitlm.config import TrainConfig
    from bitlm.objectives import BitObjective

    torch.manual_seed(0)
    model = BitTransformerLM(**TINY, arch=arch, **({"patch_bytes": 1} if arch == "byte_patch" else {}))
    batch = torch.tensor(text_to_bits("the cat sat")).unsqueeze(0).repeat(2, 1)
    objective = BitObjective(TrainConfig(), model.config)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = objective(model, batch, 0)[0]
    prompt = batch[:, :27]
    steps = list(iter_generate(model, prompt, 4, temperature=1.0))
    assert all(torch.is_inference(s.bits) for s in steps)
    outs = [
        generate_bits(model, prompt, 6, temperature=1.0, generator=torch.Generator().manual_seed(0)),
        generate_bits(model, prompt[:1], 6, temperature=0.0),
        generate_bits(model, prompt, 3, temperature=1.0, use_cache=False),
    ]
    for out in outs:
        assert not torch.is_inference(out) and not out.requires_grad
        out[:, -1] = out[:, -1]  # an ordinary tensor: writing into it is allowed
    model.train()
    loss = objective(model, batch, 1)[0]
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    opt.step()
    assert objective(model, batch, 2)[0].item() != before.item()
