"""The model deployment: one quantized BitTransformerLM per replica, generating through
bitlm's one gated loop (bitlm.gated) with concurrent requests batched (``@serve.batch``).

Every attempt of every request (the first, and each retry the gate's strategy plans) goes
through the same batcher, so concurrent requests and retries share decoding steps. A
non-streamed answer is judged whole (bitlm.gated.verdict); a stream byte by byte. The gate's
settings are the deployment's ``user_config``: they change without a restart.
"""

import asyncio
import os
from typing import Any

import torch
from ray import serve

from bitlm.gated import Attempts, ByteEvent, GateSettings, stream_batch, verdict
from serve.protocol import answer


def load_checkpoint(checkpoint: str, tracking_uri: str | None = None):
    """A BitTransformerLM from a checkpoint directory, or an MLflow URI: ``runs:/<id>/checkpoint``,
    or a registered model ``models:/<name>/<version>`` (pipelines/tracking.log_model)."""
    from bitlm import BitTransformerLM
    from pipelines import tracking

    if checkpoint.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        mlflow.set_tracking_uri(tracking_uri or tracking.tracking_uri())
        checkpoint = mlflow.artifacts.download_artifacts(artifact_uri=checkpoint)
    return BitTransformerLM.from_pretrained(tracking.resolve_checkpoint(checkpoint)).eval()


def quantize(model, mode: str):
    from bitlm.quantization import convert_qat_fx, prepare_fused, prepare_qat_fx, quantize_dynamic

    if mode == "none":
        return model
    if mode == "int8":
        # Its fused passes compile now, before the replica takes requests, and here rather than
        # in a thread: a compilation saves and restores the global random state, which would
        # rewind the draws of unseeded requests running beside it.
        prepare_fused(next(model.parameters()).device)
        return quantize_dynamic(model)
    if mode == "4bit":
        return convert_qat_fx(prepare_qat_fx(model))
    raise ValueError(f"quantization must be none, int8 or 4bit, got {mode!r}")


# Decoding steps a batch of whole (non-streamed) answers takes per trip off the event loop: each
# trip is a thread hand-off and a yield through Serve's batcher, which cost as much as a step.
STEPS_PER_CALL = 16


def _advance(steps, n: int) -> list:
    """Up to ``n`` more steps of a batch's decoding (fewer when it ends)."""
    out = []
    for _ in range(n):
        events = next(steps, None)
        if events is None:
            break
        out.append(events)
    return out


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, health_check_period_s=10)
class BitLMModel:
    def __init__(
        self,
        checkpoint: str,
        quantization: str = "int8",
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        tracking_uri: str | None = None,
        threads: int = 1,
    ):
        from ray.serve.metrics import Counter

        torch.set_num_threads(threads)
        self.model = quantize(load_checkpoint(checkpoint, tracking_uri), quantization)
        self.quantization = quantization
        self.gate = GateSettings()
        self.batch_sizes: list[int] = []
        self._stream_batch.set_max_batch_size(max_batch_size)
        self._stream_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.bytes_counter = Counter("bitlm_generated_bytes_total", description="Bytes generated")
        self.blocks_counter = Counter(
            "bitlm_gate_blocks_total", description="Generations blocked by the gate", tag_keys=("metric",)
        )

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        gate = GateSettings(**(user_config or {}).get("gate", {}))
        gate.check_model(self.model)  # a retry strategy this model cannot run is refused here
        self.gate = gate

    def check_health(self) -> None:
        with torch.no_grad():
            self.model(torch.zeros(1, 9, dtype=torch.long), telemetry=False)

    def info(self) -> dict[str, Any]:
        cfg = self.model.config
        return {
            "pid": os.getpid(),
            "arch": cfg.arch,
            "patch_bytes": cfg.patch_bytes,
            "d_model": cfg.d_model,
            "num_layers": cfg.num_layers,
            "context_bytes": cfg.max_seq_len // 9,
            "quantization": self.quantization,
            "gate": self.gate.__dict__,
            "batch_sizes": self.batch_sizes[-200:],
            "batches": len(self.batch_sizes),
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _stream_batch(self, requests: list[dict[str, Any]]):
        """One decoding loop for all the attempts of a batch: those with the same strategy and
        prompt length share forward passes; the others run side by side, step by step. Each
        request receives lists of its byte events: one byte at a time when any request of the
        batch streams, else up to STEPS_PER_CALL."""
        self.batch_sizes.append(len(requests))
        groups: dict[tuple[str, int, int, bool], list[int]] = {}
        for i, r in enumerate(requests):  # a denoising attempt runs alone: its seed is its own
            alone = i if r["strategy"] == "diffusion" else -1
            groups.setdefault((r["strategy"], len(r["prompt"]), alone, r["whole"]), []).append(i)
        iterators = {
            key: stream_batch(
                self.model,
                [requests[i]["prompt"] for i in idx],
                [requests[i]["max_new_bytes"] for i in idx],
                [float(requests[i]["temperature"]) for i in idx],
                [float(requests[i]["top_p"]) for i in idx],
                [requests[i].get("seed") for i in idx],
                self.gate.open() if key[3] else self.gate,  # a whole answer is judged at its end
                key[0],
            )
            for key, idx in groups.items()
        }
        finished = [False] * len(requests)
        # several steps a trip only when no request of the batch streams: a stream waits for
        # every group's trip before its next byte
        n = STEPS_PER_CALL if all(key[3] for key in groups) else 1
        while not all(finished):
            out: list[Any] = [StopIteration] * len(requests)
            for key, idx in groups.items():
                if all(finished[i] for i in idx):
                    continue
                steps = await asyncio.to_thread(_advance, iterators[key], n)  # compute off the event loop
                for j, i in enumerate(idx):
                    events = [e[j].as_dict() for e in steps if e[j] is not None]
                    finished[i] = len(steps) < n or steps[-1][j] is None
                    if events:
                        out[i] = events
            if any(o is not StopIteration for o in out):
                yield out

    async def _attempt(self, request: dict[str, Any], plan) -> list[dict[str, Any]]:
        strategy = "diffusion" if plan.strategy == "diffusion" else "sample"
        attempt = {**request, "temperature": plan.temperature, "seed": plan.seed, "strategy": strategy}
        return [e async for events in self._stream_batch({**attempt, "whole": True}) for e in events]

    def _finish(self, attempts: Attempts, n_bytes: int) -> dict[str, Any]:
        done = attempts.completion()
        self.bytes_counter.inc(n_bytes)
        if not done.passed:
            for metric in done.attempts[-1]["failed"] or {"unknown": 0}:
                self.blocks_counter.inc(tags={"metric": metric})
        return answer(done, self.gate)

    async def stream(self, request: dict[str, Any]):
        """Byte events of the first attempt (a stream cannot take back what it sent, so it is
        not retried), then a final verdict event."""
        attempts = Attempts(self.gate, request["temperature"], request.get("seed"), max_retries=0)
        plan = next(iter(attempts))
        strategy = {"temperature": plan.temperature, "seed": plan.seed, "strategy": "sample", "whole": False}
        events = []
        async for chunk in self._stream_batch({**request, **strategy}):
            for event in chunk:
                events.append(event)
                yield {"type": "byte", **event}
        attempts.record(plan, [ByteEvent(**e) for e in events])
        yield {"type": "done", **self._finish(attempts, len(events))}

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """A whole generation: attempts planned by the gate (bitlm.gated.Attempts) until one
        passes, each through the batcher."""
        attempts = Attempts(self.gate, request["temperature"], request.get("seed"))
        generated = 0
        for plan in attempts:
            events = [ByteEvent(**e) for e in await self._attempt(request, plan)]
            generated += len(events)
            attempts.record(plan, events, verdict(events, self.gate))
        return self._finish(attempts, generated)
