import pytest
import torch

from bitlm import BitTransformerLM, text_to_bits

TINY = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=256, dropout=0.0)


def _bits(n_bytes=20, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (batch, n_bytes), generator=g)
    from bitlm import bytes_to_bits

    return torch.from_numpy(bytes_to_bits(data.numpy().astype("uint8"))).long()


def test_forward_shapes_and_telemetry_keys():
    model = BitTransformerLM(**TINY)
    bits = _bits()
    logits, tel = model(bits)
    assert logits.shape == (2, bits.size(1), 2)
    for key in ("negentropy_logits", "lz_complexity_logits", "symbiosis_score"):
        assert tel[key].dim() == 0 and 0.0 <= float(tel[key]) <= 1.0
    assert len(tel["activations"]) == 2 and tel["activations"][0].shape == (2, bits.size(1), 32)
    assert tel["attention_maps"] == []


def test_attention_maps_when_asked():
    model = BitTransformerLM(**TINY, full_attn_logging=True)
    bits = _bits(batch=1)
    _, tel = model(bits)
    T = bits.size(1)
    assert [a.shape for a in tel["attention_maps"]] == [(1, 4, T, T)] * 2
    att = tel["attention_maps"][0][0, 0]
    assert torch.allclose(att.sum(-1), torch.ones(T))
    assert att.triu(1).abs().max() == 0  # causal


def test_causal_perturbing_a_later_bit_leaves_earlier_logits():
    model = BitTransformerLM(**TINY).eval()
    bits = _bits(batch=1)
    t = 50
    flipped = bits.clone()
    flipped[0, t] ^= 1
    a, b = model(bits)[0], model(flipped)[0]
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("chunk", [None, 16])
def test_kv_cache_logits_equal_full_forward(chunk):
    model = BitTransformerLM(**TINY, chunk_size=chunk).eval()
    bits = _bits(n_bytes=24)
    full, _ = model(bits)
    cache = model.new_cache()
    parts = [model(bits[:, :37], cache)[0]]
    for t in range(37, bits.size(1), 5):
        parts.append(model(bits[:, t : t + 5], cache)[0])
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)
    assert cache.length == bits.size(1)


def test_chunked_attention_is_local_and_equals_masked_reference():
    model = BitTransformerLM(**TINY, chunk_size=16).eval()
    bits = _bits(batch=1)
    fast = model(bits)[0]
    reference = model(bits, return_attention=True)[0]  # explicit masked attention
    assert torch.allclose(fast, reference, atol=1e-5)
    att = model(bits, return_attention=True)[1]["attention_maps"][0][0, 0]
    T = bits.size(1)
    i = torch.arange(T)
    outside = (i[:, None] - i[None, :]) >= 16
    assert att[outside].abs().max() == 0
    full = BitTransformerLM(**TINY).eval()
    full.load_state_dict(model.state_dict())
    assert not torch.allclose(full(bits)[0], fast)


def test_chunked_receptive_field_is_bounded():
    # plain bit embedding: a position's input is its own bit only
    cfg = dict(TINY, num_layers=1, bit_embedding="plain")
    model = BitTransformerLM(**cfg, chunk_size=8).eval()
    bits = _bits(batch=1)
    flipped = bits.clone()
    flipped[0, 20] ^= 1
    a, b = model(bits)[0], model(flipped)[0]
    # one layer of window 8: position t sees t-7..t, so bit 20 affects positions 20..27 only
    diff = (a - b).abs().amax(-1)[0]
    assert diff[20:28].max() > 0
    assert diff[28:].max() == 0 and diff[:20].max() == 0


def test_too_long_input_is_refused_clearly():
    model = BitTransformerLM(**dict(TINY, max_seq_len=36))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="0 and 1"):
        model(torch.full((1, 9), 2))


def test_one_dimensional_input_is_a_batch_of_one():
    model = BitTransformerLM(**TINY)
    logits, _ = model(torch.tensor(text_to_bits("hi")))
    assert logits.shape == (1, 18, 2)


def test_telemetry_carries_grad_only_when_regularized():
    bits = _bits()
    plain = BitTransformerLM(**TINY)
    _, tel = plain(bits)
    assert not tel["negentropy_logits"].requires_grad
    reg = BitTransformerLM(**TINY, lambda_K=0.1, lambda_C=0.1, lambda_S=0.1)
    _, tel = reg(bits)
    assert all(tel[k].requires_grad for k in ("negentropy_logits", "lz_complexity_logits", "symbiosis_score"))


def test_guide_arguments_and_defaults():
    model = BitTransformerLM()
    assert (model.config.d_model, model.config.num_layers) == (128, 4)
    assert model.lambda_K == 0.0
    assert BitTransformerLM(lambda_K=0.25).lambda_K == 0.25


def test_prefix_embedding_sees_the_byte_so_far():
    from bitlm.bit_arch import _prefix_features

    node, prev = _prefix_features(torch.tensor([text_to_bits("AC")]))
    # "A" = 0b01000001: nodes of depth 1..8 are offset 2^(k+1) - 2 plus the prefix value
    assert node[0, :9].tolist() == [0, 1 + 2, 2 + 6, 4 + 14, 8 + 30, 16 + 62, 32 + 126, 65 + 254, 65 + 510]
    assert prev[0].tolist() == [256] * 9 + [65] * 9


def test_prefix_embedding_with_cache_matches_full_forward_from_any_split():
    model = BitTransformerLM(**TINY).eval()
    bits = _bits(n_bytes=12, batch=1)
    full = model(bits)[0]
    for split in (1, 8, 9, 13, 50):
        cache = model.new_cache()
        parts = [model(bits[:, :split], cache)[0]]
        parts += [model(bits[:, t : t + 1], cache)[0] for t in range(split, bits.size(1))]
        assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5), split


def test_infer_long_sequence_equals_full_pass_when_it_fits():
    from bitlm import infer_long_sequence

    model = BitTransformerLM(**TINY).eval()
    bits = _bits(n_bytes=28)  # 252 bits, fits max_seq_len 256
    assert torch.equal(infer_long_sequence(model, bits, chunk_size=72, overlap=18), model(bits)[0])


def test_infer_long_sequence_windows_past_the_context():
    from bitlm import infer_long_sequence

    model = BitTransformerLM(**dict(TINY, max_seq_len=72)).eval()
    bits = _bits(n_bytes=40, batch=2)  # 360 bits, 5x the context
    out = infer_long_sequence(model, bits, chunk_size=72, overlap=36)
    assert out.shape == (2, 360, 2)
    assert torch.equal(out[:, :72], model(bits[:, :72])[0])  # the first window as is
    # position 100 comes from the window starting at 36 (stride 36): it sees bits 36..100
    assert torch.allclose(out[:, 100], model(bits[:, 36:108])[0][:, 100 - 36], atol=1e-6)
    with pytest.raises(ValueError, match="stride"):
        infer_long_sequence(model, bits, chunk_size=72, stride=0)


@pytest.mark.parametrize("arch", ["bit", "byte_patch"])
def test_dropout_acts_in_training_at_the_probability_set_dropout_gives(arch):
    """Dropout is skipped only where it is the identity: training at p > 0 draws new masks
    (two passes differ), eval and p = 0 do not; set_dropout's p is the one that counts."""
    from bitlm import set_dropout

    bits = torch.tensor(text_to_bits("dropout draws masks in training. "))[None, :135]
    model = BitTransformerLM(**{**TINY, "arch": arch, "ngram_dropout": 0.0})  # built at p = 0
    model.train()
    assert torch.equal(model(bits)[0], model(bits)[0])
    set_dropout(model, 0.3)
    assert not torch.equal(model(bits)[0], model(bits)[0])
    model.eval()
    assert torch.equal(model(bits)[0], model(bits)[0])
    model.train()
    set_dropout(model, 0.0)
    assert torch.equal(model(bits)[0], model(bits)[0])
