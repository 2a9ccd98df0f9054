"""benchmarks/space_patch.py, the dynamic-patching experiment quality.py trains: its patches
follow the rule its docstring gives, depend only on earlier bytes, and the model is causal and
learns through the one optimizer step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from space_patch import SpacePatchLM, patch_layout  # noqa: E402

from bitlm import TrainConfig, Trainer  # noqa: E402


def _patches(text: bytes, max_patch: int) -> list[bytes]:
    """The patches of ``text`` (its last byte's patch as the bytes before it decide it)."""
    x = torch.tensor(list(text))[None]
    _, offset = patch_layout(x, max_patch)
    out, cur = [], b""
    for i, b in enumerate(text):
        if offset[0, i] == 0 and cur:
            out.append(cur)
            cur = b""
        cur += bytes([b])
    return out + [cur]


def _rule(text: bytes, max_patch: int) -> list[bytes]:
    """The rule of the module docstring, byte by byte in plain Python."""
    space = [c < 128 and not chr(c).isalnum() for c in text]
    out, cur, since = [], b"", 0
    for u, c in enumerate(text):
        since = 0 if u == 0 or (space[u - 1] and not (u >= 2 and space[u - 2])) else since + 1
        if since % max_patch == 0 and cur:
            out.append(cur)
            cur = b""
        cur += bytes([c])
    return out + [cur]


def test_the_layout_is_the_rule_on_any_bytes():
    torch.manual_seed(0)
    for max_patch in (3, 8):
        for _ in range(20):
            text = bytes(torch.randint(0, 256, (60,)).tolist())
            text += bytes(torch.tensor(list(b" .abcXYZ09\n")).gather(0, torch.randint(0, 11, (60,))).tolist())
            assert _patches(text, max_patch) == _rule(text, max_patch)


def test_patches_end_after_space_like_bytes_and_a_run_of_them_joins_the_next_word():
    assert _patches(b"the cat  sat.on(mat) z", 8) == [b"the ", b"cat ", b" sat.", b"on(", b"mat)", b" z"]
    # the bytes of a multi-byte character belong to their word
    assert _patches("née été".encode(), 8) == ["née ".encode(), "été".encode()]


def test_a_long_word_is_cut_every_max_patch_bytes():
    assert _patches(b"ab " + b"x" * 11 + b" y", 4) == [b"ab ", b"xxxx", b"xxxx", b"xxx ", b"y"]
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 300))
    pid, offset = patch_layout(x, 5)
    assert int(offset.max()) == 4 and bool((offset[:, 0] == 0).all()) and bool((pid[:, 0] == 0).all())
    steps = pid.diff(dim=1)
    assert bool(((steps == 0) | (steps == 1)).all())
    assert bool(((steps == 1) == (offset[:, 1:] == 0)).all())  # a new patch is where the offset restarts
    assert bool((offset[:, 1:][steps == 0] == offset[:, :-1][steps == 0] + 1).all())


def test_the_patch_of_a_byte_depends_on_earlier_bytes_only():
    torch.manual_seed(0)
    x = torch.randint(0, 128, (4, 200))
    pid, offset = patch_layout(x, 8)
    for t in (3, 50, 199):
        y = x.clone()
        y[:, t:] = torch.randint(0, 128, (4, 200 - t))
        pid2, offset2 = patch_layout(y, 8)
        # byte u's patch (index u, byte 200 the next one) reads bytes < u
        assert torch.equal(pid2[:, : t + 1], pid[:, : t + 1]) and torch.equal(offset2[:, : t + 1], offset[:, : t + 1])


def _model(**kw) -> SpacePatchLM:
    torch.manual_seed(0)
    return SpacePatchLM(32, 4, 2, 128, 128, ngram_sizes=[2, 3], **kw)


def test_the_model_is_causal():
    model = _model(max_patch=4).eval()
    x = torch.tensor(list(b"def f(x):\n    return x + 1  # the answer, with some words after it" * 2))[None, :127]
    x = torch.cat([x, torch.randint(0, 256, (2, 127))])
    with torch.no_grad():
        base = model(x)
        assert base.shape == (3, 127, 256)
        for t in (1, 9, 60, 126):
            y = x.clone()
            y[:, t] = (y[:, t] + 32) % 256
            moved = (model(y) - base).abs().amax(-1)
            assert float(moved[:, :t].max()) < 1e-5  # logits[:, u] predict byte u + 1 from bytes <= u
            assert float(moved[:, t:].max()) > 0


def test_a_patch_is_predicted_from_the_global_output_after_the_patch_before_it():
    """Without n-grams, the first byte of a patch has no local context (no bytes of its patch
    before it), so its prediction comes from the global model alone: it must change when the
    last byte of the patch before changes (h_k has seen patch k - 1), and not when a byte of its
    own patch does (the causality test) — reading h_(k-1), or no global output, fails here."""
    torch.manual_seed(0)
    model = SpacePatchLM(32, 4, 2, 128, 128, ngram_sizes=None).eval()
    text = b"one two three four five six"
    x = torch.tensor(list(text))[None]
    starts = [i for i in range(1, len(text)) if text[i - 1 : i] == b" "]  # the words' first bytes
    with torch.no_grad():
        base = model(x)
        for s in starts:
            y = x.clone()
            y[0, s - 2] = ord("q")  # the word before's last letter: the patches stay as they were
            moved = (model(y) - base).abs().amax(-1)[0]
            assert float(moved[s - 1]) > 1e-4  # logits[s - 1] predict byte s, the next word's first


def test_training_lowers_the_loss_through_the_one_optimizer_step():
    from byte_gpt import ByteObjective

    model = _model()
    text = torch.tensor(list(b"the quick brown fox jumps over the lazy dog. " * 8))[:129]
    batch = text[None].repeat(4, 1)
    trainer = Trainer(model, TrainConfig(lr=3e-3, warmup_steps=0, weight_decay=0.0), objective=ByteObjective())
    losses = [trainer.train_step([batch])["loss"] for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0]
    pid, _ = patch_layout(batch[:, :-1], 8)
    assert model.mean_patches() == model.mean_positions() == int(pid[0, -1]) + 1  # rows alike: no padding
    assert int(pid[0, -1]) + 1 == len(_rule(bytes(text.tolist()), 8)) < 129 / 4  # word-sized patches
