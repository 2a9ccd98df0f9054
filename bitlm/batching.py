"""Continuous batching for ``arch="byte_patch"``: the rows of many requests, each at its own
position, decoded together, one byte per row a step.

A group of requests joins a :class:`SharedBatch` with :meth:`~SharedBatch.add`: its prompts (of
one length) are read in a pass of their own, and its rows' caches are appended to the batch's,
each row keeping its own length (bitlm.attention.KVCache.lengths: positions, cache writes and
attention masks per row). Every step then draws one byte for every row (:meth:`~SharedBatch.draw`,
each row with its own temperature, top-p and generator) and feeds the bytes of the rows that go
on (:meth:`~SharedBatch.feed`, ``model.decode_bytes``); the rows that end leave.

With one byte per patch every row's byte is a global step, and the batch is one call a step.
With P > 1 a row's global step comes with the last byte of each of its patches, so the rows
are kept in *lanes* by their place in their patch (at most P): a lane's rows complete their
patches on the same steps, and a step feeds each lane its bytes, one global step (for that
lane's rows alone) when its patches complete: the global work of a step is the rows of about
one lane in P, as it is for a row decoding alone.

A row's bytes are the ones it gets decoding alone with bitlm.generate (the same distributions up
to float rounding in batched products, the same draws from its own generator; a row at
temperature 1 and top-p 1 beside tempered rows is drawn through the tempered formula, which
equals its distribution up to rounding, as in any batch of bitlm.generate), as long as its
prompt and answer fit the context (:meth:`~SharedBatch.fits`: plain decoding would restart the
context past it). :class:`SharedGroup` gates a group's rows on it, as bitlm.gated.stream_batch
gates a batch of its own; Serve's decoding loop
(serve/decoder.py) keeps one per replica, so a request joins the rows in flight at the next byte.
"""

from __future__ import annotations

import contextlib

import torch

from .attention import KVCache
from .bits import BYTE_BITS
from .gated import ByteEvent, GateSettings, _gated, _generators, _prompt_bits
from .generate import GeneratedByte, _check_prompt, _draw_byte, _eval_mode, _SamplingRule


class _Lane:
    """Rows at one place in their patches (all of them when P = 1): one cache, each row's own
    length in it, and each row's next-byte distribution, sampling settings and generator."""

    def __init__(self, cache: KVCache, log_q: torch.Tensor, t, p, generators: list, ids: list[int]):
        self.cache, self.log_q, self.t, self.p = cache, log_q, t, p
        self.generators, self.ids = list(generators), list(ids)
        self.lengths = [cache.length] * len(ids)  # each row's positions in the cache
        self.place = _place_in_patch(cache)

    def join(self, other: _Lane, row_state: tuple[str, ...]) -> None:
        self.cache = _merged(self.cache, other.cache, row_state)
        self.log_q, self.t, self.p = (
            torch.cat(x) for x in ((self.log_q, other.log_q), (self.t, other.t), (self.p, other.p))
        )
        self.generators += other.generators
        self.ids += other.ids
        self.lengths += other.lengths

    def select(self, keep: list[int], row_state: tuple[str, ...]) -> None:
        idx = torch.tensor(keep, dtype=torch.long, device=self.log_q.device)
        c = self.cache
        c.k = [None if x is None else x[idx] for x in c.k]
        c.v = [None if x is None else x[idx] for x in c.v]
        c.state = {k: c.state[k][idx] for k in row_state if c.state.get(k) is not None}
        self.log_q, self.t, self.p = (x[idx] for x in (self.log_q, self.t, self.p))
        self.generators = [self.generators[i] for i in keep]
        self.ids = [self.ids[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]

    def feed(self, model: torch.nn.Module, values: torch.Tensor) -> None:
        """Feed each row its byte ``values`` (B,) in one call."""
        c = self.cache
        c.length = max(self.lengths)
        # rows at one position (one row, or groups that joined together) take the cache's plain path
        ragged = any(n != c.length for n in self.lengths)
        c.lengths = torch.tensor(self.lengths, device=values.device) if ragged else None
        before = c.length
        self.log_q = model.decode_bytes(values[:, None], c)[:, 0]
        grew = c.length - before  # 1 when the byte was a global step (every byte when P = 1)
        self.lengths = [n + grew for n in self.lengths]
        self.place = _place_in_patch(c)


def _place_in_patch(cache: KVCache) -> int:
    """Bytes of the unfinished patch a (byte_patch) cache holds: 0 at a patch boundary."""
    values = cache.state.get("tail_values")
    if values is not None:
        return values.size(1)
    tail = cache.state.get("tail")
    return 0 if tail is None else tail.size(1) // 9


class SharedBatch:
    """The rows in flight of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module):
        if not self.supports(model):
            raise ValueError("continuous batching decodes whole bytes: arch='byte_patch'")
        self.model = model
        self.device = next(model.parameters()).device
        self.lanes: list[_Lane] = []  # at most one per place in a patch
        self._next_id = 0
        self._rule: _SamplingRule | None = None
        self._bytes: torch.Tensor | None = None  # (B,) the bytes drawn last, lane after lane
        self.bits: torch.Tensor | None = None  # (B, 9) their bits
        self.log_q: torch.Tensor | None = None  # (B, 256) what each was drawn from
        self.index: dict[int, int] = {}  # row id -> its place in bits / log_q of the last draw

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        return hasattr(getattr(model, "io", None), "embed_bytes")

    def fits(self, prompt_bytes: int, max_new_bytes: int) -> bool:
        """Whether a request decodes here as it would alone: prompt and answer within the context."""
        return prompt_bytes + max_new_bytes <= self.model.io.max_bits // 9

    @property
    def ids(self) -> list[int]:
        """The rows' ids, lane after lane (the order of a draw)."""
        return [r for lane in self.lanes for r in lane.ids]

    def __len__(self) -> int:
        return sum(len(lane.ids) for lane in self.lanes)

    @torch.no_grad()
    def add(self, prompt_bits: torch.Tensor, temperature, top_p, generators: list) -> list[int]:
        """Rows for prompts (B, 9n) of one length, their sampling settings (per row) and
        generators (one per row, None for the global one); returns the rows' ids."""
        prompt_bits = _check_prompt(prompt_bits).to(self.device)
        B, n = prompt_bits.size(0), prompt_bits.size(1) // 9
        if not self.fits(n, 1) or len(generators) != B:
            raise ValueError(f"{B} prompts of {n} bytes with {len(generators)} generators do not fit this batch")
        cache = self.model.new_cache()
        with _eval_mode(self.model):
            self.model(prompt_bits, cache, telemetry=False, decode=False)
            log_q = self.model.io.next_byte_log_probs(cache)
        t = torch.as_tensor(temperature, dtype=torch.float32).expand(B).to(self.device)
        p = torch.as_tensor(top_p, dtype=torch.float32).expand(B).to(self.device)
        ids = list(range(self._next_id, self._next_id + B))
        self._next_id += B
        new = _Lane(cache, log_q, t, p, generators, ids)
        lane = next((x for x in self.lanes if x.place == new.place), None)
        if lane is None:
            self.lanes.append(new)
        else:
            lane.join(new, self.model.io.ROW_STATE)
        self._rule = None
        return ids

    def draw(self) -> None:
        """One byte for every row, from its distribution with its settings: ``bits`` (B, 9),
        ``log_q`` what each was drawn from, ``index`` where each row's is."""
        self.log_q = torch.cat([lane.log_q for lane in self.lanes])
        if self._rule is None:
            t, p = (torch.cat([getattr(lane, k) for lane in self.lanes]) for k in ("t", "p"))
            self._rule = _SamplingRule(t, p, len(t), self.device)
        generators = [g for lane in self.lanes for g in lane.generators]
        self._bytes = _draw_byte(self.log_q, self._rule, generators)
        self.bits = BYTE_BITS.to(self.device)[self._bytes]
        self.index = {r: i for i, r in enumerate(self.ids)}

    def feed(self, going_on: set[int]) -> None:
        """Drop the rows not in ``going_on``; feed the others' drawn bytes (a call per lane)."""
        quiet = _eval_mode(self.model) if self.model.training else contextlib.nullcontext()
        lanes, at = [], 0
        with quiet, torch.no_grad():
            for lane in self.lanes:
                values = self._bytes[at : at + len(lane.ids)]
                at += len(lane.ids)
                keep = [i for i, r in enumerate(lane.ids) if r in going_on]
                if not keep:
                    continue
                if len(keep) < len(lane.ids):
                    lane.select(keep, self.model.io.ROW_STATE)
                    values = values[torch.tensor(keep, device=values.device)]
                lane.feed(self.model, values)
                lanes.append(lane)  # lanes move on together: their places stay apart
        self.lanes, self._rule = lanes, None


class SharedGroup:
    """One attempt for a group of requests (prompts of one length) decoded in a SharedBatch:
    stream_batch's events, each step one event per request (None once it has finished), each
    request with its own settings, seed and gate. It joins ``shared`` at once; then, each
    step, the caller runs ``shared.draw()``, takes this group's events with ``next()``, and
    feeds the rows that go on (:meth:`going_on`, of every group) with ``shared.feed``."""

    def __init__(
        self,
        shared: SharedBatch,
        prompts: list[bytes] | torch.Tensor,
        max_new_bytes: list[int],
        temperature: list[float],
        top_p: list[float],
        seeds: list[int | None],
        gate: GateSettings | None = None,
    ):
        prompt_bits = _prompt_bits(prompts)
        if not shared.fits(prompt_bits.size(1) // 9, max(max_new_bytes)):
            raise ValueError(
                f"prompts of {prompt_bits.size(1) // 9} bytes and answers of up to {max(max_new_bytes)} do not fit "
                f"the context of {shared.model.io.max_bits // 9} bytes that a shared batch decodes in"
            )
        self.shared, self.max_new = shared, list(max_new_bytes)
        self.rows = shared.add(prompt_bits, temperature, top_p, _generators(seeds, shared.device))
        self.live = [n > 0 for n in self.max_new]
        self._events = _gated(shared.model, prompt_bits, self._steps(), self.max_new, gate or GateSettings())

    def _steps(self):
        while True:  # this group's rows of each draw (a row that left reads another's: unused)
            s = self.shared
            if s.ids and s.bits is None:
                raise RuntimeError("SharedGroup steps after shared.draw(): call it first, each step")
            if not s.ids:
                yield GeneratedByte(
                    torch.zeros(len(self.rows), 9, dtype=torch.long), log_q=torch.zeros(len(self.rows), 256)
                )
                continue
            idx = torch.tensor([s.index.get(r, 0) for r in self.rows], device=s.device)
            yield GeneratedByte(s.bits[idx], log_q=s.log_q[idx])

    def __iter__(self):
        return self

    def __next__(self) -> list[ByteEvent | None]:
        events = next(self._events)
        for b, event in enumerate(events):
            if event is None or event.blocked or event.index + 1 >= self.max_new[b]:
                self.live[b] = False
        return events

    def going_on(self, keep: list[bool] | None = None) -> set[int]:
        """The ids of this group's rows that decode another byte (and whose ``keep`` is true)."""
        return {r for b, r in enumerate(self.rows) if self.live[b] and (keep is None or keep[b])}


def _merged(a: KVCache, b: KVCache, row_state: tuple[str, ...]) -> KVCache:
    """One cache of a's rows then b's (SharedBatch keeps each row's length); of the state, the
    rows' own (``row_state``: what decoding a row carries between bytes)."""
    if a.capacity != b.capacity:
        raise ValueError(f"caches of {a.capacity} and {b.capacity} positions do not merge")
    out = KVCache(len(a.k), a.capacity)
    out.k = [torch.cat([x, y]) for x, y in zip(a.k, b.k)]
    out.v = [torch.cat([x, y]) for x, y in zip(a.v, b.v)]
    out.state = {k: torch.cat([a.state[k], b.state[k]]) for k in row_state if a.state.get(k) is not None}
    return out
