"""arch="byte_patch": the same API as the bit model, one transformer position per patch."""

import math

import pytest
import torch

from bitlm import BitTransformerLM, bytes_to_bits, generate_bits, parity_ok, sample_text, text_to_bits, train_loop
from bitlm.quantization import convert_qat_fx, prepare_qat_fx, quantize_dynamic
from bitlm.scale import expand_model

CFG = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=288, dropout=0.0, arch="byte_patch")


def _bits(n_bytes=30, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (batch, n_bytes), generator=g).numpy().astype("uint8")
    return torch.from_numpy(bytes_to_bits(data)).long()


@pytest.fixture(
    params=[(1, []), (2, []), (4, []), (1, [2, 3, 5]), (4, [2, 4])], ids=lambda p: f"P{p[0]}" + "-ngrams" * bool(p[1])
)
def model(request):
    """Each patch size, and with hashed n-gram embeddings (which must keep every property)."""
    torch.manual_seed(0)
    P, ngrams = request.param
    return BitTransformerLM(**CFG, patch_bytes=P, ngram_sizes=ngrams, ngram_vocab=64).eval()


def test_shapes_and_one_distribution_per_bit(model):
    bits = _bits()
    logits, tel = model(bits)
    assert logits.shape == (2, bits.size(1), 2)
    assert all(0 <= float(tel[k]) <= 1 for k in ("negentropy_logits", "lz_complexity_logits", "symbiosis_score"))
    # K counts data-bit predictions only: the parity bits, certain by construction, would add
    # ~1/9 of free certainty to an untrained model that knows nothing of random bytes
    assert float(tel["negentropy_logits"]) < 0.05


def test_logits_depend_only_on_earlier_bits(model):
    bits = _bits(batch=1)
    base = model(bits)[0]
    for t in (0, 8, 9, 20, 44, 100, 200):
        flipped = bits.clone()
        flipped[0, t] ^= 1
        assert torch.allclose(model(flipped)[0][:, :t], base[:, :t], atol=1e-5), t


def test_parity_positions_carry_probability_one_for_the_right_bit(model):
    bits = _bits()
    probs = model(bits)[0].softmax(-1)
    p = torch.arange(1, bits.size(1))
    parity_targets = p % 9 == 8
    right = probs[:, :-1][:, parity_targets].gather(-1, bits[:, 1:][:, parity_targets].unsqueeze(-1))
    assert torch.all(right == 1.0)


def test_byte_probabilities_sum_to_one(model):
    """At a byte start, the 256 paths through the prefix tree form a distribution."""
    prefix = _bits(n_bytes=5, batch=1)
    total = 0.0
    candidates = torch.from_numpy(bytes_to_bits(torch.arange(256).numpy().astype("uint8")[:, None])).long()  # (256, 9)
    seqs = torch.cat([prefix.expand(256, -1), candidates], 1)
    logp = model(seqs)[0].log_softmax(-1)
    start = prefix.size(1) - 1  # logits at position t predict bit t+1
    for i in range(8):
        total_i = logp[:, start + i].gather(-1, seqs[:, start + i + 1 : start + i + 2]).squeeze(-1)
        total = total + total_i
    assert math.isclose(float(torch.logsumexp(total, 0).exp()), 1.0, rel_tol=1e-4)


def test_cached_and_uncached_generation_agree(model):
    prompt = torch.tensor(text_to_bits("patches"))
    a, la = generate_bits(model, prompt, 12, temperature=0, use_cache=True, return_logits=True, draft=0)
    b, lb = generate_bits(model, prompt, 12, temperature=0, use_cache=False, return_logits=True)
    assert torch.equal(a, b) and torch.allclose(la, lb, atol=1e-4)
    c, lc = generate_bits(model, prompt, 12, temperature=0, return_logits=True)  # the default: speculative
    assert torch.equal(c, b) and torch.allclose(lc, lb, atol=1e-4)
    cache = model.new_cache()
    bits = _bits(batch=1)
    parts = [model(bits[:, :13], cache)[0]] + [model(bits[:, t : t + 5], cache)[0] for t in range(13, bits.size(1), 5)]
    assert torch.allclose(torch.cat(parts, 1), model(bits)[0], atol=1e-5)


def _bitwise_byte_probs(model, prefix: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """P(next byte = v) for all 256 v when its 8 bits are drawn one at a time by sample_bit's
    rule (tempered, top-p truncated, greedy at 0) from the model's own per-bit logits."""
    candidates = torch.from_numpy(bytes_to_bits(bytes(range(256)))).long().view(256, 9)
    seqs = torch.cat([prefix.expand(256, -1), candidates], 1)
    with torch.no_grad():
        logits = model(seqs, telemetry=False)[0]
    start = prefix.size(1) - 1  # logits at position t predict bit t+1
    total = torch.ones(256, dtype=torch.float64)
    for i in range(8):
        lg = logits[:, start + i].double()
        bit = seqs[:, start + i + 1]
        greedy = lg.argmax(-1)
        probs = torch.softmax(lg / max(temperature, 1e-6), -1)
        keep = (temperature <= 0) | (probs.max(-1).values >= top_p)
        p_bit = torch.where(keep, (bit == greedy).double(), probs.gather(-1, bit[:, None]).squeeze(-1))
        total = total * p_bit
    return total


@pytest.mark.parametrize("decoder", ["softmax", "tree"])
@pytest.mark.parametrize("P", [1, 2])
def test_bytes_drawn_whole_are_the_bits_drawn_one_by_one(decoder, P):
    """Cached generation draws each byte whole, in one draw from the local decoder; uncached
    generation feeds the model bit by bit. Greedy, both give the same bytes and the same
    per-bit distributions; sampling, a whole byte is drawn with exactly the probability that
    the bit-by-bit draw gives it, at any temperature and top_p."""
    from bitlm.byte_patch import node_logits
    from bitlm.generate import byte_log_probs

    torch.manual_seed(1)
    model = BitTransformerLM(**{**CFG, "patch_bytes": P, "local_decoder": decoder}).eval()
    prompt = torch.tensor(text_to_bits("whole bytes"))
    runs = [generate_bits(model, prompt, 20, 0.0, 1.0, None, cache, True, draft=0) for cache in (True, False)]
    assert torch.equal(runs[0][0], runs[1][0])
    assert torch.allclose(runs[0][1].log_softmax(-1), runs[1][1].log_softmax(-1), atol=1e-4)
    for prefix_text in ("whole bytes", "whole bytes!"):  # the next byte starts, or continues, a patch
        prefix = torch.tensor(text_to_bits(prefix_text))[None]
        cache = model.new_cache()
        with torch.no_grad():
            model(prefix, cache, telemetry=False, decode=False)
            log_q = model.io.next_byte_log_probs(cache)
        for temperature, top_p in ((0.0, 1.0), (1.0, 1.0), (0.7, 0.9), (1.5, 0.6), (0.3, 0.99)):
            whole = byte_log_probs(node_logits(log_q), temperature, top_p).exp()[0].double()
            bitwise = _bitwise_byte_probs(model, prefix, temperature, top_p)
            assert torch.allclose(whole, bitwise, atol=1e-5), (temperature, top_p)
            assert math.isclose(float(whole.sum()), 1.0, rel_tol=1e-5)


def test_decode_bytes_is_feeding_the_bytes_bits(model):
    """Generation's step (whole byte values in) gives the byte distribution after each byte
    that feeding their bits gives, and leaves the cache where the bits leave it: later calls of
    either kind agree too (n-gram history, patch tails and positions included), and bytes fed
    after bits (the running sums over a patch remade from its bytes, mid-patch) agree again."""
    from bitlm.bits import BYTE_BITS

    prompt, later = _bits(7, batch=2, seed=3), torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fast, slow = model.new_cache(), model.new_cache()
        model(prompt, fast, telemetry=False, decode=False)
        model(prompt, slow, telemetry=False, decode=False)
        got = model.decode_bytes(later[:, :4], fast)  # (2, 4, 256)
        want = []
        for j in range(4):
            model(BYTE_BITS[later[:, j]], slow, telemetry=False, decode=False)
            want.append(model.io.next_byte_log_probs(slow))
        assert got.shape == (2, 4, 256)
        assert torch.allclose(got, torch.stack(want, 1), atol=1e-5)
        assert (fast.length, fast.bits_seen) == (slow.length, slow.bits_seen)
        tail = BYTE_BITS[later[:, 4:6]].view(2, -1)
        assert torch.allclose(model(tail, fast)[0], model(tail, slow)[0], atol=1e-5)
        got = model.decode_bytes(later[:, 6:], fast)
        for j in range(6, 9):
            model(BYTE_BITS[later[:, j]], slow, telemetry=False, decode=False)
            assert torch.allclose(got[:, j - 6], model.io.next_byte_log_probs(slow), atol=1e-5)


def test_ngram_rows_of_the_byte_before_and_the_history_carried():
    """NgramEmbedding's ``before`` row is the n-grams ending at the byte before the values (what
    the local decoder reads), and a history carried between calls gives what one call gives."""
    from bitlm.ngrams import NgramEmbedding

    torch.manual_seed(0)
    emb = NgramEmbedding([2, 3, 4], 64, 8).eval()
    values = torch.randint(0, 256, (2, 12))
    whole, hist = emb(values)
    ext, _ = emb(values, before=True)
    assert torch.equal(ext[:, 1:], whole)
    first, mid = emb(values[:, :5])
    rest, hist2 = emb(values[:, 5:], mid, before=True)
    assert torch.allclose(torch.cat([first, rest[:, 1:]], 1), whole) and torch.equal(hist2, hist)
    assert torch.allclose(rest[:, 0], first[:, -1])  # the row before byte 5: the n-grams ending at byte 4


def test_ngram_dropout_leaves_rows_out_in_training_only_and_keeps_the_mean():
    from bitlm.ngrams import NgramEmbedding

    torch.manual_seed(0)
    emb = NgramEmbedding([2, 3], 64, 8, dropout=0.5)
    values = torch.randint(0, 256, (1, 6))
    emb.eval()
    kept = emb(values)[0]
    assert torch.equal(emb(values)[0], kept)
    emb.train()
    with torch.no_grad():
        draws = torch.stack([emb(values)[0] for _ in range(4000)])
    assert not torch.equal(draws[0], draws[1])
    # each of the 2 rows kept with probability 1/2, scaled by 2: the mean is the sum kept in eval
    assert torch.allclose(draws.mean(0), kept, atol=0.1 * float(kept.abs().max()))
    model = BitTransformerLM(**CFG, patch_bytes=2, ngram_sizes=[2, 3], ngram_dropout=0.5).train()
    bits = _bits(batch=1)
    assert not torch.equal(model(bits)[0], model(bits)[0])
    model.eval()
    assert torch.equal(model(bits)[0], model(bits)[0])


def test_decode_bytes_is_byte_patchs_only_and_continues_a_sequence():
    model = BitTransformerLM(**{**CFG, "arch": "bit"}).eval()
    with pytest.raises(ValueError, match="decodes bits"):
        model.decode_bytes(torch.tensor([[65]]), model.new_cache())
    model = BitTransformerLM(**{**CFG, "patch_bytes": 1}).eval()  # a sequence starts with the start vector
    with pytest.raises(ValueError, match="start vector"):
        model.decode_bytes(torch.tensor([[65]]), model.new_cache())


def test_bytes_drawn_whole_follow_the_decoders_byte_distribution():
    torch.manual_seed(2)
    model = BitTransformerLM(**{**CFG, "patch_bytes": 1}).eval()
    prompt = torch.tensor(text_to_bits("q"))[None].repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    out = generate_bits(model, prompt, 1, 1.0, 1.0, g)[:, 9:]  # 4000 draws of the next byte
    counts = torch.bincount(torch.from_numpy(bytes_to_bits_values(out)), minlength=256).double()
    with torch.no_grad():
        cache = model.new_cache()
        model(prompt[:1], cache)
        q = model.io.next_byte_log_probs(cache).exp()[0].double()
    chi2 = float(((counts - 4000 * q) ** 2 / (4000 * q)).sum())
    assert chi2 < 255 + 5 * (2 * 255) ** 0.5  # chi-square, 255 degrees of freedom: within 5 sigma


def bytes_to_bits_values(bits: torch.Tensor):
    from bitlm import bits_to_bytes

    return __import__("numpy").frombuffer(b"".join(bits_to_bytes(bits)), dtype="uint8").astype("int64")


def test_generation_always_passes_parity(model):
    out = generate_bits(
        model,
        torch.tensor(text_to_bits("ok")).repeat(3, 1),
        40,
        temperature=1.5,
        generator=torch.Generator().manual_seed(1),
    )
    assert parity_ok(out).all()
    assert isinstance(sample_text(model, "Hi", 10, seed=0), str)


def test_train_loop_lowers_loss_and_parity_costs_nothing():
    torch.manual_seed(0)
    model = BitTransformerLM(**CFG, patch_bytes=2)
    stream = torch.tensor(text_to_bits("byte patches learn fast. " * 30))
    data = torch.stack([stream[9 * i : 9 * i + 288] for i in range(40)])
    h = train_loop(model, data, epochs=6, batch_size=8, lr=3e-3, val_data=data[:8])
    assert h.steps[-1]["loss"] < 0.5 * h.steps[0]["loss"]
    assert h.evals[-1]["val_parity_bpb"] < 1e-6


@pytest.mark.parametrize("strategy", ["depth", "width", "context"])
def test_expansion_preserves_function(strategy):
    torch.manual_seed(0)
    model = BitTransformerLM(**CFG, patch_bytes=2).eval()
    bits = _bits()
    assert torch.allclose(expand_model(model, strategy).eval()(bits)[0], model(bits)[0], atol=1e-5)


def test_checkpoint_records_the_architecture(tmp_path):
    model = BitTransformerLM(**CFG, patch_bytes=4).eval()
    model.save_pretrained(tmp_path)
    loaded = BitTransformerLM.from_pretrained(tmp_path).eval()
    assert (loaded.config.arch, loaded.config.patch_bytes) == ("byte_patch", 4)
    bits = _bits()
    assert torch.equal(loaded(bits)[0], model(bits)[0])


def test_quantized_byte_patch_models_run():
    model = BitTransformerLM(**CFG, patch_bytes=2).eval()
    bits = _bits()
    ref = model(bits)[0].softmax(-1)
    assert (quantize_dynamic(model)(bits)[0].softmax(-1) - ref).abs().max() < 0.05
    assert convert_qat_fx(prepare_qat_fx(model))(bits)[0].shape == ref.shape


def test_denoising_mode_gives_each_bit_its_marginal_and_sees_the_whole_window(model):
    bits = _bits(n_bytes=13)  # not a whole number of patches for P = 2, 4: padded inside
    logits, _ = model(bits, causal=False)
    assert logits.shape == (2, bits.size(1), 2)
    assert torch.allclose(logits.logsumexp(-1), torch.zeros(2, bits.size(1)), atol=1e-4)  # distributions
    flipped = bits.clone()
    flipped[:, -3] ^= 1
    assert not torch.allclose(model(flipped, causal=False)[0][:, :9], logits[:, :9])  # earlier bytes see it
    with pytest.raises(ValueError, match="no KV cache"):
        model(bits, model.new_cache(), causal=False)
