"""A replica's one decoding loop: every attempt of every request decodes here, batched.

The loop runs on its own thread. A request waits in a queue; at a step boundary with room
(fewer than ``max_batch_size`` rows decoding) the loop admits what is waiting and decodes all
rows a byte at a time. Requests admitted together with the same strategy, prompt length and
kind of answer form a group (one gate and telemetry per request, one prompt pass). For the
byte-patch model (one byte per patch) every group's rows decode in the replica's one
bitlm.batching.SharedBatch: one forward pass a step for all of them, whatever their positions
(continuous batching); a request that does not fit it (a denoising retry, or a prompt and
answer longer than the context) decodes as a group of its own (bitlm.gated.stream_batch, a
forward pass a step), as every group does for other models; at most ``MAX_GROUPS`` such groups
decode at once, and a request that would make another waits for one to end. So a request starts beside the work in flight instead of waiting for it to end. Waiting
jobs are gathered until they fill the batch, or none has joined them for ``QUIET_S``, or the
first has waited ``wait_s`` (decoding goes on meanwhile): fewer prompt passes.

Events reach the asyncio side through each request's queue: a streamed request gets each
byte's event as it is made, a whole answer all of them at its end (one hand-off). A request
whose reader went away is dropped at the next step; a group whose every request went away
stops decoding.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from bitlm.batching import SharedBatch, SharedGroup
from bitlm.gated import ByteEvent, GateSettings, stream_batch

_END = object()
# Groups of their own decoding at once (those outside the shared batch). A step costs each a
# forward pass (on 2 CPU cores at the demo's size ~2.4 ms, plus ~0.16 ms a row:
# benchmarks/serve_bench.py), so rows spread over many groups decode at a fraction of the speed
# of one batch.
MAX_GROUPS = 2
QUIET_S = 0.002  # gathering ends early once no request has joined for this long


@dataclass
class _Job:
    request: dict[str, Any]  # prompt, max_new_bytes, temperature, top_p, seed, strategy
    whole: bool  # a whole answer (judged at its end) rather than a stream
    gate: GateSettings
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrived: float = field(default_factory=time.monotonic)
    events: list[ByteEvent] = field(default_factory=list)
    gone: bool = False  # its reader stopped listening

    def key(self, index: int) -> tuple:
        alone = index if self.request["strategy"] == "diffusion" else -1  # a denoising attempt runs alone
        return (self.request["strategy"], len(self.request["prompt"]), alone, self.whole)

    def fits(self, shared: SharedBatch | None) -> bool:
        """Whether it decodes in the shared batch."""
        r = self.request
        return shared is not None and r["strategy"] != "diffusion" and shared.fits(len(r["prompt"]), r["max_new_bytes"])

    def send(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class _Group:
    """Jobs admitted together: one gate each, their rows in the shared batch (SharedGroup) or
    in a batch of their own (stream_batch)."""

    def __init__(self, model: torch.nn.Module, jobs: list[_Job], shared: SharedBatch | None = None):
        self.jobs, self.shared = jobs, shared is not None
        r = [j.request for j in jobs]
        gate = jobs[0].gate.open() if jobs[0].whole else jobs[0].gate  # a whole answer is judged at its end
        args = (
            [x["prompt"] for x in r],
            [x["max_new_bytes"] for x in r],
            [float(x["temperature"]) for x in r],
            [float(x["top_p"]) for x in r],
            [x.get("seed") for x in r],
            gate,
        )
        self.steps: Iterator[list[ByteEvent | None]]
        if shared is not None:
            self.steps = SharedGroup(shared, *args)
        else:
            self.steps = stream_batch(model, *args, r[0]["strategy"], draft=0)  # a forward pass a step
        self.open = [True] * len(jobs)

    def going_on(self) -> set[int]:
        """Its rows in the shared batch that decode another byte."""
        return self.steps.going_on([o and not j.gone for o, j in zip(self.open, self.jobs)])

    def fail(self, exc: BaseException) -> None:
        for i, job in enumerate(self.jobs):
            if self.open[i]:
                job.send(exc)
        self.open = [False] * len(self.jobs)

    def step(self) -> bool:
        """One byte for every open job; False once the group has finished."""
        try:
            events = next(self.steps, None)
        except Exception as exc:  # noqa: BLE001 - the group's requests get the error, the loop goes on
            self.fail(exc)
            return False
        for i, job in enumerate(self.jobs):
            if not self.open[i]:
                continue
            event = None if events is None else events[i]
            if event is None or job.gone:
                self.open[i] = False
                if job.whole and not job.gone:
                    job.send(job.events)
                job.send(_END)
            elif job.whole:
                job.events.append(event)
            else:
                job.send([event])
        return any(self.open)


class Decoder:
    """The decoding loop of one replica (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_batch_size: int = 16, wait_s: float = 0.01):
        self.model = model
        self.shared = SharedBatch(model) if SharedBatch.supports(model) else None
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self.batch_sizes: deque[int] = deque(maxlen=200)  # rows decoding together after each admission
        self.admissions = self.steps = self.row_steps = self.passes = 0
        self._pending: deque[_Job] = deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="bitlm-decoder", daemon=True)
        self._thread.start()

    def stats(self) -> dict[str, Any]:
        return {
            "batch_sizes": list(self.batch_sizes),
            "batches": self.admissions,
            "decoding_steps": self.steps,
            "row_steps": self.row_steps,  # rows decoded, summed over the steps
            "rows_per_step": self.row_steps / self.steps if self.steps else 0.0,
            "forward_passes": self.passes,  # a step's: one for the shared batch, one per group of its own
            "rows_per_pass": self.row_steps / self.passes if self.passes else 0.0,
        }

    async def events(self, request: dict[str, Any], whole: bool, gate: GateSettings) -> AsyncIterator[list[ByteEvent]]:
        """Lists of the request's byte events as they come (a whole answer: one list at its end)."""
        job = _Job(request, whole, gate, asyncio.get_running_loop(), asyncio.Queue())
        with self._cv:
            self._pending.append(job)
            self._cv.notify()
        try:
            while (item := await job.queue.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.gone = True

    def _ready(self, rows: int, now: float) -> float:
        """0 when the waiting jobs should be admitted now, else how long to wait for more: until
        they fill the batch, or no one has joined them for QUIET_S, or the first has waited wait_s."""
        first, last = self._pending[0].arrived, self._pending[-1].arrived
        if len(self._pending) >= self.max_batch_size - rows:
            return 0.0
        return max(0.0, min(last + min(QUIET_S, self.wait_s), first + self.wait_s) - now)

    def _admit(self, running: list[_Group], rows: int) -> list[_Group]:
        """New groups of the waiting jobs, when a slot is free and they are gathered; blocks
        only when nothing is decoding."""
        with self._cv:
            while True:
                separate = sum(not g.shared for g in running)
                if running and (rows >= self.max_batch_size or (self.shared is None and separate >= MAX_GROUPS)):
                    return []
                if self._pending:
                    wait = self._ready(rows, time.monotonic())
                    if wait == 0.0:
                        break
                    if running:
                        return []  # decode on; look again after this step
                    self._cv.wait(wait)
                elif running:
                    return []
                else:
                    self._cv.wait()
            jobs, deferred, keys = [], [], set()
            while self._pending and rows + len(jobs) < self.max_batch_size:
                job = self._pending.popleft()
                if job.gone:
                    continue
                if not job.fits(self.shared):  # a group of its own: at most MAX_GROUPS of those at once
                    key = job.key(len(jobs))
                    if key not in keys and separate + len(keys) >= MAX_GROUPS:
                        deferred.append(job)  # it waits for one of them to end
                        continue
                    keys.add(key)
                jobs.append(job)
            self._pending.extendleft(reversed(deferred))
        groups: dict[tuple, list[_Job]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.fits(self.shared), *job.key(i)), []).append(job)
        new = []
        for (shared, *_), members in groups.items():
            try:
                new.append(_Group(self.model, members, self.shared if shared else None))
            except Exception as exc:  # noqa: BLE001 - a request the model refuses fails alone
                for job in members:
                    job.send(exc)
        if jobs:
            self.admissions += 1
            self.batch_sizes.append(rows + len(jobs))
        return new

    def _run(self) -> None:
        running: list[_Group] = []
        with torch.inference_mode():
            while True:
                running += self._admit(running, sum(sum(g.open) for g in running))
                if self.shared is not None and len(self.shared):
                    running = self._shared_step(running, self.shared.draw)
                self.steps += bool(running)
                self.row_steps += sum(sum(g.open) for g in running)  # the newly admitted count too
                self.passes += sum(not g.shared for g in running) + bool(self.shared is not None and len(self.shared))
                running = [g for g in running if g.step()]
                if self.shared is not None and len(self.shared):
                    going = set().union(*(g.going_on() for g in running if g.shared))
                    running = self._shared_step(running, self.shared.feed, going)

    def _shared_step(self, running: list[_Group], work, *args) -> list[_Group]:
        """``work(*args)`` on the shared batch; if it fails, its groups' requests get the error and the
        batch starts empty (the groups of their own go on)."""
        try:
            work(*args)
            return running
        except Exception as exc:  # noqa: BLE001 - the shared rows' requests get the error, the loop goes on
            for g in running:
                if g.shared:
                    g.fail(exc)
            self.shared = SharedBatch(self.model)
            return [g for g in running if not g.shared]
