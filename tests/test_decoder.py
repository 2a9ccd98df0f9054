"""Serve's decoding loop (serve/decoder.py) on a real model, without Ray: requests that arrive
together decode as one batch and each gets what it would alone; a request that arrives while
others decode joins them at the next byte; a reader that leaves stops its rows; a refused
request fails alone; a greedy request decodes a forward pass a step (no speculation)."""

import asyncio

import pytest
import torch
from conftest import train_on_phrase

from bitlm import BitTransformerLM
from bitlm.gated import GateSettings, stream_bytes
from serve.decoder import Decoder

CFG = dict(d_model=32, nhead=4, num_layers=2, dim_feedforward=64, max_seq_len=9 * 256, dropout=0.0)
OPEN = GateSettings(c_floor=0.0, s_floor=0.0, burn_in=0, max_retries=0)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BitTransformerLM(**CFG, arch="byte_patch", patch_bytes=1).eval()


def _request(prompt: bytes, n: int, seed: int, temperature: float = 1.0) -> dict:
    return {"prompt": prompt, "max_new_bytes": n, "temperature": temperature, "top_p": 1.0, "seed": seed}


async def _whole(decoder: Decoder, request: dict, strategy: str = "sample") -> bytes:
    chunks = [c async for c in decoder.events({**request, "strategy": strategy}, True, OPEN)]
    assert len(chunks) == 1  # a whole answer arrives in one hand-off
    return bytes(e.byte for e in chunks[0])


def test_requests_that_arrive_together_share_a_batch_and_get_what_they_would_alone(model):
    decoder = Decoder(model, max_batch_size=8, wait_s=0.5)
    requests = [_request(b"abcd", 12 + i, seed=i) for i in range(4)]

    async def main():
        return await asyncio.gather(*(_whole(decoder, r) for r in requests))

    got = asyncio.run(main())
    alone = [bytes(e.byte for e in stream_bytes(model, b"abcd", 12 + i, 1.0, 1.0, i, OPEN)) for i in range(4)]
    assert got == alone and [len(g) for g in got] == [12, 13, 14, 15]
    assert decoder.stats()["batch_sizes"] == [4] and decoder.stats()["batches"] == 1


def test_a_request_arriving_mid_batch_joins_at_the_next_byte(model):
    decoder = Decoder(model, max_batch_size=8, wait_s=0.0)

    async def main():
        long = decoder.events({**_request(b"abcd", 200, 0), "strategy": "sample"}, False, OPEN)
        first = await anext(long)  # the long request is decoding
        short = await _whole(decoder, _request(b"xy", 5, 1))  # another prompt length: its own group
        rest = [e async for chunk in long for e in chunk]
        return first + rest, short

    streamed, short = asyncio.run(main())
    assert len(streamed) == 200 and len(short) == 5
    assert short == bytes(e.byte for e in stream_bytes(model, b"xy", 5, 1.0, 1.0, 1, OPEN))
    assert bytes(e.byte for e in streamed) == bytes(
        e.byte for e in stream_bytes(model, b"abcd", 200, 1.0, 1.0, 0, OPEN)
    )
    # the short one decoded beside the long one and finished first, not after it
    assert decoder.stats()["batch_sizes"] == [1, 2] and decoder.stats()["rows_per_step"] > 1.0


def test_a_reader_that_leaves_stops_its_rows(model):
    decoder = Decoder(model, max_batch_size=8, wait_s=0.0)

    async def main():
        stream = decoder.events({**_request(b"abcd", 250, 0), "strategy": "sample"}, False, OPEN)
        await anext(stream)
        await stream.aclose()  # the client went away after one byte
        await asyncio.sleep(0.5)
        before = decoder.stats()["decoding_steps"]
        await asyncio.sleep(0.5)
        return before, decoder.stats()["decoding_steps"]

    before, after = asyncio.run(main())
    assert before == after and before < 250


def test_a_refused_request_fails_alone(model):
    decoder = Decoder(model, max_batch_size=8, wait_s=0.2)

    async def main():
        bad = _whole(decoder, _request(b"", 4, 0))  # no prompt: stream_batch refuses it
        good = _whole(decoder, _request(b"abcd", 6, 3))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(main())
    assert isinstance(bad, ValueError) and "whole bytes" in str(bad)
    assert good == bytes(e.byte for e in stream_bytes(model, b"abcd", 6, 1.0, 1.0, 3, OPEN))


def _three_groups(decoder: Decoder, long_bytes: int, second_bytes: int, third_bytes: int = 3) -> list[str]:
    """A long stream, then a second and a third request of other prompt lengths; the order in
    which the two whole answers finished."""
    done = []

    async def whole(name, request):
        await _whole(decoder, request)
        done.append(name)

    async def main():
        long = decoder.events({**_request(b"abcd", long_bytes, 0), "strategy": "sample"}, False, OPEN)
        await anext(long)
        second = asyncio.create_task(whole("second", _request(b"xy", second_bytes, 1)))
        await asyncio.sleep(0.05)  # the second group is decoding
        third = asyncio.create_task(whole("third", _request(b"xyz", third_bytes, 2)))
        await asyncio.gather(second, third)
        [e async for chunk in long for e in chunk]

    asyncio.run(main())
    return done


def test_rows_at_different_positions_share_one_forward_pass_a_step(model):
    """The byte-patch model's rows decode in one shared batch: a third prompt length joins at
    the next byte (its 3 bytes end long before the second's 60), and however many groups
    decode, a step is one forward pass."""
    decoder = Decoder(model, max_batch_size=8, wait_s=0.0)
    assert _three_groups(decoder, 150, 60) == ["third", "second"]
    stats = decoder.stats()
    assert stats["batch_sizes"] == [1, 2, 3]
    # one pass a step (but the last: the long stream's end, with no row left to feed)
    assert stats["decoding_steps"] - 1 <= stats["forward_passes"] <= stats["decoding_steps"]
    assert stats["rows_per_pass"] > 1.0


def test_without_a_shared_batch_at_most_two_groups_decode_at_once():
    """arch="bit" decodes bit by bit, each group its own forward pass per step: a third prompt
    length waits for a slot, and a freed slot takes what waited."""
    torch.manual_seed(0)
    bit = BitTransformerLM(**{**CFG, "max_seq_len": 9 * 64}).eval()
    decoder = Decoder(bit, max_batch_size=8, wait_s=0.0)
    assert decoder.shared is None
    assert _three_groups(decoder, 40, 20) == ["second", "third"]  # 3 bytes, yet it waited for a slot
    assert decoder.stats()["batch_sizes"] == [1, 2, 2]


def test_requests_that_do_not_fit_the_shared_batch_decode_in_at_most_two_groups_of_their_own():
    """Prompt and answer past the byte-patch model's context (16 bytes here) restart it, which
    the shared batch does not: such requests decode in groups of their own, two at once."""
    torch.manual_seed(0)
    small = BitTransformerLM(**{**CFG, "max_seq_len": 9 * 16}, arch="byte_patch", patch_bytes=1).eval()
    decoder = Decoder(small, max_batch_size=8, wait_s=0.0)
    assert decoder.shared is not None and not decoder.shared.fits(3, 14)
    assert _three_groups(decoder, 150, 60, third_bytes=14) == ["second", "third"]  # it waited for a slot
    stats = decoder.stats()
    assert stats["batch_sizes"] == [1, 2, 2] and stats["forward_passes"] > stats["decoding_steps"]


def test_a_greedy_request_of_its_own_decodes_plainly_a_forward_pass_a_step():
    """Outside the shared batch a greedy request decodes without speculation (which bitlm's
    in-process generation does by default), so the loop's forward-pass count stays true. The
    model is trained on a repeated phrase, where speculation would take several bytes a call."""
    torch.manual_seed(0)
    small = train_on_phrase(
        BitTransformerLM(**{**CFG, "max_seq_len": 9 * 16}, arch="byte_patch", patch_bytes=1), 16, 80
    )
    decoder = Decoder(small, max_batch_size=8, wait_s=0.0)
    assert not decoder.shared.fits(12, 40)
    calls, real = [], small.decode_bytes
    small.decode_bytes = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        got = asyncio.run(_whole(decoder, _request(b"the cat sat ", 40, 0, temperature=0.0)))
    finally:
        del small.decode_bytes
    alone = bytes(e.byte for e in stream_bytes(small, b"the cat sat ", 40, 0.0, 1.0, 0, OPEN))
    assert got == alone and b"mat" in got  # what bitlm gives it (speculating), and it learnt the phrase
    assert len(calls) == 39  # a byte a call, but the last byte, which is never fed
