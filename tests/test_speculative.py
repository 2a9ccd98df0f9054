"""Speculative decoding (bitlm.generate, ``draft=``): bytes drafted from the context or the
model's reference bigrams and verified in one model call give the same greedy output as plain
decoding, and samples from the same distribution."""

import pytest
import torch
from conftest import train_on_phrase

from bitlm import BitTransformerLM, bits_to_bytes, bytes_to_bits, generate_bits
from bitlm.byte_patch import node_logits
from bitlm.drafts import GREEDY_DRAFT, PAUSE_STEPS, lookup_draft, next_draft_count, propose_drafts
from bitlm.gated import GateSettings, complete
from bitlm.generate import byte_log_probs, iter_generate

CFG = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=9 * 48, dropout=0.0)
PATTERN = b"the cat sat on the mat. "


@pytest.fixture(scope="module")
def peaked():
    """A tiny byte-patch model trained briefly on a repeated phrase: its next-byte
    distributions are peaked, so drafts from the context are often (not always) accepted."""
    torch.manual_seed(0)
    return train_on_phrase(BitTransformerLM(**CFG, arch="byte_patch", patch_bytes=1, ngram_sizes=[2, 3]), 40)


def test_lookup_draft_continues_the_latest_match():
    assert lookup_draft(b"abcXabcYab", 3) == b"cYa"  # the latest earlier "ab"
    assert lookup_draft(b"xyz", 4) == b""
    assert lookup_draft(b"aaaa", 2) == b"a"  # what follows the match, up to the end
    assert lookup_draft(b"xaby", 2, n_min=2) == b""  # no match at all
    assert lookup_draft(b"abXaYb", 2, n_min=2) == b""  # "b" matched before, but no two bytes did
    assert lookup_draft(b"abXab", 2, n_min=2) == b"Xa"


@pytest.mark.parametrize("ngrams", [[], [2, 3]])
def test_greedy_speculation_is_plain_greedy_decoding(ngrams):
    """Over context restarts too (48-byte context, 120 bytes generated), for a batch."""
    torch.manual_seed(1)
    model = BitTransformerLM(**CFG, arch="byte_patch", patch_bytes=1, ngram_sizes=ngrams).eval()
    prompt = torch.from_numpy(bytes_to_bits(PATTERN)).long()[None].repeat(2, 1)
    plain = generate_bits(model, prompt, 120, temperature=0.0, draft=0)
    spec = generate_bits(model, prompt, 120, temperature=0.0, draft=6)
    assert torch.equal(plain, spec)


def _model_calls(model, run) -> int:
    """How many model calls (forward or decode_bytes) ``run()`` makes."""
    calls = []
    real = {name: getattr(model, name) for name in ("forward", "decode_bytes")}

    def counting(name):
        def call(*a, **k):
            calls.append(name)
            return real[name](*a, **k)

        return call

    for name in real:  # a model call is either
        setattr(model, name, counting(name))
    try:
        run()
    finally:
        for name in real:
            delattr(model, name)
    return len(calls)


def test_greedy_speculation_on_a_trained_model_accepts_drafts(peaked):
    prompt = torch.from_numpy(bytes_to_bits(PATTERN * 2)).long()[None]
    out = {}
    n_spec = _model_calls(peaked, lambda: out.update(spec=generate_bits(peaked, prompt, 60, temperature=0.0, draft=6)))
    n_plain = _model_calls(
        peaked, lambda: out.update(plain=generate_bits(peaked, prompt, 60, temperature=0.0, draft=0))
    )
    assert torch.equal(out["plain"], out["spec"])
    assert n_spec < n_plain / 2  # most bytes came several to a model call


def test_greedy_decoding_speculates_by_default_and_sampling_does_not(peaked):
    """draft=None (the default of generate_bits, iter_generate and so sample_text and
    bitlm.gated): up to GREEDY_DRAFT drafts a call for one greedy row, plain decoding (a call a
    byte) for a sampled row or a batch."""
    prompt = torch.from_numpy(bytes_to_bits(PATTERN * 2)).long()[None]
    bits, calls = {}, {}
    for name, draft in (("default", None), ("spec", GREEDY_DRAFT), ("plain", 0)):
        run = lambda n=name, d=draft: bits.update({n: generate_bits(peaked, prompt, 60, 0.0, draft=d)})  # noqa: E731
        calls[name] = _model_calls(peaked, run)
    assert calls["default"] == calls["spec"] < calls["plain"] / 2
    assert torch.equal(bits["default"], bits["plain"])
    gate = GateSettings(c_floor=0.0, s_floor=0.0, burn_in=0, max_retries=0)
    done = {}
    n_gated = _model_calls(peaked, lambda: done.update(c=complete(peaked, PATTERN * 2, 60, 0.0, gate=gate)))
    assert n_gated < calls["plain"] / 2  # the one gated loop speculates too
    assert done["c"].data == bits_to_bytes(bits["plain"][0, 9 * 48 :].numpy())
    for temps in ([0.0, 0.0], [0.0, 1.0]):  # a batch decodes plainly (the slowest row's drafts bind all)
        n = _model_calls(peaked, lambda t=temps: generate_bits(peaked, prompt.repeat(2, 1), 60, torch.tensor(t)))
        assert n == calls["plain"]
    g = torch.Generator().manual_seed(0)
    assert _model_calls(peaked, lambda: generate_bits(peaked, prompt, 60, 1.0, generator=g)) == calls["plain"]


def test_draft_length_starts_at_two_and_grows_to_the_limit(peaked):
    """The first call verifies at most 2 drafts, and each call after one that kept all its
    drafts at most 2 more: on text the model knows well it reaches the ``draft`` limit, and
    not before the fourth drafted call."""
    widths = []
    real = peaked.decode_bytes

    def record(values, cache):
        widths.append(values.size(1) - 1)  # the byte decided last, and the drafts
        return real(values, cache)

    peaked.decode_bytes = record
    try:
        generate_bits(peaked, torch.from_numpy(bytes_to_bits(PATTERN * 2)).long()[None], 80, temperature=0.0, draft=8)
    finally:
        del peaked.decode_bytes
    drafted = [w for w in widths if w]
    assert drafted[0] <= 2 and max(drafted) == 8
    assert drafted.index(8) >= 3  # 2, 4, 6 first: it grows by 2 a call at most


def _first_two(model, prompt, n, temperature, top_p, draft):
    """(first, second) generated byte values of n independent generations (one seed each)."""
    out = []
    for seed in range(n):
        g = torch.Generator().manual_seed(seed)
        steps = iter_generate(model, prompt, 2, temperature, top_p, g, True, draft)
        values = [int((s.bits[0, :8] * torch.tensor([128, 64, 32, 16, 8, 4, 2, 1])).sum()) for s in steps]
        out.append(tuple(values))
    return out


def _exact(model, prompt, temperature, top_p) -> torch.Tensor:
    """The sampling distribution of the next byte after ``prompt`` (256,), float64."""
    with torch.no_grad():
        cache = model.new_cache()
        model(prompt, cache, telemetry=False, decode=False)
        log_q = model.io.next_byte_log_probs(cache)
    return byte_log_probs(node_logits(log_q), temperature, top_p).exp()[0].double()


def _chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> bool:
    """Pearson's chi-square within 5 standard deviations of its mean (bins with an expected
    count under 5 pooled into one)."""
    n = counts.sum()
    expected = n * p
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    dof = len(obs) - 1
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    return chi2 < dof + 5 * (2 * dof) ** 0.5


def test_drafting_grows_after_kept_drafts_shrinks_after_a_rejection_and_pauses():
    assert next_draft_count(2, True, 8) == 4 and next_draft_count(8, True, 8) == 8
    assert next_draft_count(4, False, 8) == 3 and next_draft_count(1, False, 8) == 0


def test_drafts_that_keep_being_rejected_pause_drafting_then_drafting_resumes(peaked, monkeypatch):
    """A reference whose likeliest byte is one the model never picks: each lone draft is
    rejected, and PAUSE_STEPS plain steps follow it before the next."""
    from bitlm.reference import Reference

    counts = torch.zeros(257, 256, dtype=torch.float64)
    counts[:, 0] = 1000.0  # byte 0 after every byte
    monkeypatch.setattr(peaked, "reference", Reference(counts))
    widths, real = [], peaked.decode_bytes
    monkeypatch.setattr(peaked, "decode_bytes", lambda v, c: widths.append(v.size(1) - 1) or real(v, c))
    prompt = torch.from_numpy(bytes_to_bits(b"xq")).long()[None]  # no context match to draft from
    out = generate_bits(peaked, prompt, 12, temperature=0.0, draft=4)  # before the text repeats
    assert 0 not in bits_to_bytes(out[0].numpy())
    lone = [i for i, w in enumerate(widths) if w == 1]
    assert widths[0] == 2 and len(lone) >= 2  # 2 rejected, then 1, rejected: a pause
    for i in lone[:-1]:
        assert widths[i + 1 : i + 1 + PAUSE_STEPS] == [0] * PAUSE_STEPS


def test_without_a_context_match_the_reference_bigram_chain_is_drafted():
    likeliest = bytes((a + 1) % 256 for a in range(256))  # the byte after a: a + 1
    assert propose_drafts(b"xyz", 3, likeliest) == b"{|}"  # no earlier match: the chain from "z"
    assert propose_drafts(b"xaXa", 2, likeliest) == b"bc"  # a one-byte match is not used
    assert propose_drafts(b"abXab", 2, likeliest) == b"Xa"  # a two-byte match is
    assert propose_drafts(b"abXab", 4, likeliest) == b"Xabc"  # and the chain continues it to the end


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.5, 0.95)])
def test_a_call_without_a_context_match_samples_as_plain_decoding(peaked, temperature, top_p):
    """The prompt's last byte occurred before in it, its last two did not: the drafts are the
    model's reference's chain of likeliest bytes, and the first generated byte (the first
    draft accepted, or a draw without it) follows the model's own sampling distribution."""
    prompt = torch.from_numpy(bytes_to_bits(b"the cat")).long()[None]
    fed, real = [], peaked.decode_bytes
    peaked.decode_bytes = lambda values, cache: fed.append(values[0].tolist()) or real(values, cache)
    try:
        generate_bits(peaked, prompt, 3, temperature, top_p, draft=4)
    finally:
        del peaked.decode_bytes
    chain = peaked.reference.tables()[0][:256].argmin(1)  # the likeliest byte after each byte
    assert fed[0] == [ord("t"), int(chain[ord("t")]), int(chain[chain[ord("t")]])]
    first = torch.bincount(
        torch.tensor([a for a, _ in _first_two(peaked, prompt, 600, temperature, top_p, 4)]), minlength=256
    )
    assert _chi2_ok(first.double(), _exact(peaked, prompt, temperature, top_p))


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.5, 0.95)])
def test_speculative_samples_follow_the_models_distribution(peaked, temperature, top_p):
    """The first byte (a draft accepted, or a draw without the rejected draft) and the second
    (after either) follow the model's own sampling distribution, byte by byte."""
    prompt = torch.from_numpy(bytes_to_bits(PATTERN + b"the c")).long()[None]
    pairs = _first_two(peaked, prompt, 800, temperature, top_p, draft=4)
    first = torch.bincount(torch.tensor([a for a, _ in pairs]), minlength=256).double()
    assert _chi2_ok(first, _exact(peaked, prompt, temperature, top_p))
    mode = int(first.argmax())
    accepted = first[mode] / first.sum()
    assert 0.05 < accepted < 0.995  # drafts are accepted and rejected both
    second = torch.bincount(torch.tensor([b for a, b in pairs if a == mode]), minlength=256).double()
    after = torch.cat([prompt, torch.from_numpy(bytes_to_bits(bytes([mode]))).long()[None]], 1)
    assert _chi2_ok(second, _exact(peaked, after, temperature, top_p))


def test_a_greedy_row_beside_a_sampled_one_survives_a_near_tie():
    """greedy_byte (probability sums) and the tempered distribution (log-masses) may break a
    near tie differently: a greedy row whose draft greedy_byte rejects, while p allows only that
    draft, must still get its greedy byte, not an empty distribution to draw from."""
    from bitlm.generate import greedy_byte

    g = torch.Generator().manual_seed(0)
    q = torch.log_softmax(2 * torch.randn(2000, 256, generator=g), -1).exp()
    eps = (torch.rand(2000, 1, generator=g) - 0.5) * 1e-6  # the first bit's two subtrees nearly tied
    halves = q[:, :128] / q[:, :128].sum(-1, keepdim=True), q[:, 128:] / q[:, 128:].sum(-1, keepdim=True)
    log_q = torch.cat([halves[0] * (0.5 - eps), halves[1] * (0.5 + eps)], -1).log()
    ours, walked = greedy_byte(log_q), byte_log_probs(node_logits(log_q), 0.0, 1.0).argmax(-1)

    def alone(j: int) -> set[int]:  # a tie this near may break by the matrix product's shape (CPU kernels)
        return {int(v) for m in range(1, 9) for v in greedy_byte(log_q[j].expand(m, 256).contiguous())}

    i = next(j for j in (ours != walked).nonzero()[:, 0].tolist() if alone(j) == {int(ours[j])})
    torch.manual_seed(0)
    model = BitTransformerLM(**CFG, arch="byte_patch", patch_bytes=1).eval()
    real = model.decode_bytes
    model.decode_bytes = lambda v, c: real(v, c) * 0 + log_q[i]  # every next byte: that near tie
    other = ord("x") if int(walked[i]) != ord("x") else ord("y")
    # the prompt's last two bytes occurred before, followed by the byte greedy_byte rejects
    prompt = torch.from_numpy(bytes_to_bits(bytes([other, other, int(walked[i]), other, other])))
    out = generate_bits(model, prompt.long()[None].repeat(2, 1), 2, temperature=torch.tensor([0.0, 1.0]), draft=2)
    assert bits_to_bytes(out[0, 45:54])[0] == int(ours[i])  # the greedy row's greedy byte


def test_drafts_asked_of_a_model_that_cannot_verify_them_are_refused_by_name():
    """Speculation verifies one byte per position: a patch of several bytes (the default
    byte_patch) or decoding without the cache cannot, so draft > 0 there is an error, not a
    silent plain decode; the default (draft=None) decodes such a model plainly."""
    torch.manual_seed(0)
    patched = BitTransformerLM(**CFG, arch="byte_patch", patch_bytes=4).eval()
    prompt = torch.from_numpy(bytes_to_bits(PATTERN)).long()[None]
    with pytest.raises(ValueError, match="draft=4"):
        generate_bits(patched, prompt, 4, temperature=0.0, draft=4)
    one = BitTransformerLM(**CFG, arch="byte_patch", patch_bytes=1).eval()
    with pytest.raises(ValueError, match="use_cache=True"):
        generate_bits(one, prompt, 4, temperature=0.0, use_cache=False, draft=4)
    calls = _model_calls(patched, lambda: generate_bits(patched, prompt, 12, temperature=0.0))
    assert calls == _model_calls(patched, lambda: generate_bits(patched, prompt, 12, temperature=0.0, draft=0))
