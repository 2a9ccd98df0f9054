"""Continuous batching (bitlm.batching): rows of different prompt lengths that join a shared
batch at different steps and leave at different steps each get the bytes and telemetry they
get decoding alone; what cannot be batched so is refused by name."""

import pytest
import torch

from bitlm import BitTransformerLM
from bitlm.batching import SharedBatch, SharedGroup
from bitlm.gated import GateSettings, stream_batch

CFG = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=9 * 64, dropout=0.0)
OPEN = GateSettings().open()
# (prompt, new bytes, temperature, top_p, seed): greedy, sampled, tempered with top-p, unseeded
REQUESTS = [
    (b"hello wor", 12, 0.0, 1.0, None),
    (b"abcdefghi", 10, 1.0, 1.0, 5),
    (b"xy", 15, 0.8, 0.9, 7),
    (b"longer prompt here", 6, 1.0, 1.0, 3),
    (b"xy", 9, 1.2, 1.0, 11),
]
JOINS = {0: [[0, 1]], 3: [[2, 4]], 5: [[3]]}  # step -> groups (request indices) that join then


def _model(**overrides) -> BitTransformerLM:
    torch.manual_seed(0)
    cfg = {**CFG, "arch": "byte_patch", "patch_bytes": 1, "local_decoder": "softmax", "ngram_sizes": [2, 3]}
    return BitTransformerLM(**{**cfg, **overrides}).eval()


def _events(events) -> list[tuple]:
    return [(e.byte, round(e.K, 5), round(e.C, 5), round(e.S, 5)) for e in events]


def _alone(model, request) -> list[tuple]:
    prompt, n, t, p, seed = request
    return _events(e[0] for e in stream_batch(model, [prompt], [n], [t], [p], [seed], OPEN) if e[0] is not None)


def _shared(model) -> tuple[dict[int, list], SharedBatch, int]:
    shared, got, groups, most = SharedBatch(model), {i: [] for i in range(len(REQUESTS))}, [], 0
    with torch.no_grad():
        for step in range(40):
            for idxs in JOINS.get(step, []):
                rs = [REQUESTS[i] for i in idxs]
                group = SharedGroup(shared, *([r[k] for r in rs] for k in range(5)), OPEN)
                groups.append((group, idxs))
            most = max(most, len(shared))
            if len(shared):
                shared.draw()
            alive = []
            for group, idxs in groups:
                events = next(group, None)
                if events is None:
                    continue
                for b, event in enumerate(events):
                    if event is not None:
                        got[idxs[b]].append(event)
                alive.append((group, idxs))
            groups = alive
            shared.feed(set().union(*(g.going_on() for g, _ in groups)))
    return {i: _events(e) for i, e in got.items()}, shared, most


@pytest.mark.parametrize(
    "overrides",
    [{}, {"chunk_size": 8}, {"local_decoder": "tree", "ngram_sizes": None}, {"patch_bytes": 4}, {"patch_bytes": 3}],
)
def test_rows_that_join_and_leave_at_different_steps_get_what_they_get_alone(overrides):
    """With several bytes per patch the rows sit at different places in their patches (the
    prompts' lengths differ): lanes, each with its own global steps."""
    model = _model(**overrides)
    got, shared, most = _shared(model)
    for i, request in enumerate(REQUESTS):
        assert got[i] == _alone(model, request), f"request {i}"
        assert len(got[i]) == request[1]
    assert most == 5 and len(shared) == 0 and shared.lanes == []  # all five decoded together; all left


def test_with_several_bytes_per_patch_a_step_runs_the_global_model_for_one_lane():
    """Rows at P places in their patches: each step feeds every lane its bytes (one call a
    lane), and only the lane whose patches complete runs a global step; a new row joins the
    lane at its place."""
    model = _model(patch_bytes=4)
    shared = SharedBatch(model)
    for prompt in (b"abcd", b"abcde", b"abcdef", b"abcdefgh"):  # places 0, 1, 2 and 0 again
        SharedGroup(shared, [prompt], [20], [1.0], [1.0], [0], OPEN)
    assert [(lane.place, len(lane.ids)) for lane in shared.lanes] == [(0, 2), (1, 1), (2, 1)]
    steps = []
    real = model._blocks_from
    model._blocks_from = lambda x, *a, _f=real: steps.append(x.size(0)) or _f(x, *a)
    for _ in range(4):
        shared.draw()
        shared.feed(set(shared.ids))
    assert steps == [1, 1, 2]  # place 3 -> 0: the row at 2, then the one at 1, then the two at 0
    assert [(lane.place, len(lane.ids)) for lane in shared.lanes] == [(0, 2), (1, 1), (2, 1)]
    shared.draw()
    shared.feed({shared.lanes[1].ids[0], *shared.lanes[0].ids})  # the row at place 2 leaves
    assert [(lane.place, len(lane.ids)) for lane in shared.lanes] == [(1, 2), (2, 1)]


def test_a_batch_step_is_one_forward_pass_for_every_row():
    model = _model()
    shared = SharedBatch(model)
    SharedGroup(shared, [b"abc"], [5], [1.0], [1.0], [0], OPEN)
    SharedGroup(shared, [b"a longer one"], [5], [1.0], [1.0], [1], OPEN)
    calls = []
    model.decode_bytes = lambda values, cache, _f=model.decode_bytes: calls.append(values.shape) or _f(values, cache)
    shared.draw()
    shared.feed(set(shared.ids))
    assert calls == [(2, 1)]
    (lane,) = shared.lanes
    assert lane.lengths == lane.cache.lengths.tolist() == [1 + 3 + 1, 1 + 12 + 1]  # start, prompt, byte fed


def test_what_cannot_be_batched_so_is_refused_by_name():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="arch='byte_patch'"):
        SharedBatch(BitTransformerLM(**CFG))  # arch="bit" decodes bit by bit
    model = _model()
    shared = SharedBatch(model)
    assert shared.fits(60, 4) and not shared.fits(60, 5)  # 64 bytes of context: no restart inside
    for prompt, n in ((b"x" * 64, 1), (b"x" * 60, 5)):
        with pytest.raises(ValueError, match="do not fit"):
            SharedGroup(shared, [prompt], [n], [1.0], [1.0], [0], OPEN)
    SharedGroup(shared, [b"abc"], [3], [1.0], [1.0], [0], OPEN)
    SharedGroup(shared, [b"abcdef"], [3], [1.0], [1.0], [0], OPEN)
    shared.draw()
    shared.feed(set(shared.ids))
    (lane,) = shared.lanes
    with pytest.raises(ValueError, match="different positions"):
        model(torch.zeros(2, 9, dtype=torch.long), lane.cache)  # only decode_bytes feeds such a cache
    with pytest.raises(ValueError, match="one byte a row"):
        model.decode_bytes(torch.zeros(2, 2, dtype=torch.long), lane.cache)
    assert not lane.log_q.requires_grad and lane.cache.k[0].grad_fn is None  # nothing kept for a backward


@pytest.mark.parametrize("order", [(b"abcdef", b"xy"), (b"xy", b"abcdef")])
def test_a_prompt_shorter_than_a_patch_joins_a_lane_and_a_training_model_decodes_as_in_eval(order):
    """Two prompts at one place in their patches share a lane, whichever joins first, though the
    shorter is shorter than a patch (its n-gram history is the window's start); and a model
    left in training mode (n-gram dropout 0.5) decodes its rows as generation does, in eval."""
    model = _model(patch_bytes=4, ngram_dropout=0.5)
    requests = [(prompt, 12, 1.0, 1.0, 20 + i) for i, prompt in enumerate(order)]
    want = [_alone(model, r) for r in requests]
    model.train()
    shared = SharedBatch(model)
    groups = [SharedGroup(shared, *([x] for x in r), OPEN) for r in requests]
    assert [(lane.place, len(lane.ids)) for lane in shared.lanes] == [(2, 2)]
    got: list[list] = [[], []]
    with torch.no_grad():
        for _ in range(12):
            shared.draw()
            for i, group in enumerate(groups):
                got[i] += [e for e in next(group) if e is not None]
            shared.feed(set().union(*(g.going_on() for g in groups)))
    assert [_events(g) for g in got] == want
