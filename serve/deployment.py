"""The model deployment: one quantized BitTransformerLM per replica, generating through
bitlm's one gated loop (bitlm.gated) in the replica's one decoding loop (serve/decoder.py).

Every attempt of every request (the first, and each retry the gate's strategy plans) joins
that loop at its next step, so concurrent requests and retries share decoding steps. A
non-streamed answer is judged whole (bitlm.gated.verdict); a stream byte by byte. The gate's
settings are the deployment's ``user_config``: they change without a restart.
"""

import os
from contextlib import aclosing
from typing import Any

import torch
from ray import serve

from bitlm.gated import Attempts, ByteEvent, GateSettings, verdict
from serve.decoder import Decoder
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


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64, health_check_period_s=10)
class BitLMModel:
    def __init__(
        self,
        checkpoint: str,
        quantization: str = "int8",
        max_batch_size: int = 16,
        batch_wait_timeout_s: float = 0.01,
        tracking_uri: str | None = None,
        threads: int = 1,
    ):
        from ray.serve.metrics import Counter

        torch.set_num_threads(threads)
        self.model = quantize(load_checkpoint(checkpoint, tracking_uri), quantization)
        self.quantization = quantization
        self.gate = GateSettings()
        self.decoder = Decoder(self.model, max_batch_size, batch_wait_timeout_s)
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
            **self.decoder.stats(),  # batch_sizes: rows decoding together after each of the last admissions
        }

    async def _attempt(self, request: dict[str, Any], plan) -> list[ByteEvent]:
        strategy = "diffusion" if plan.strategy == "diffusion" else "sample"
        attempt = {**request, "temperature": plan.temperature, "seed": plan.seed, "strategy": strategy}
        return [e async for events in self.decoder.events(attempt, True, self.gate) for e in events]

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
        attempt = {**request, "temperature": plan.temperature, "seed": plan.seed, "strategy": "sample"}
        events: list[ByteEvent] = []
        async with aclosing(self.decoder.events(attempt, False, self.gate)) as chunks:  # a reader gone stops its row
            async for chunk in chunks:
                for event in chunk:
                    events.append(event)
                    yield {"type": "byte", **event.as_dict()}
        attempts.record(plan, events)
        yield {"type": "done", **self._finish(attempts, len(events))}

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """A whole generation: attempts planned by the gate (bitlm.gated.Attempts) until one
        passes, each through the decoding loop."""
        attempts = Attempts(self.gate, request["temperature"], request.get("seed"))
        generated = 0
        for plan in attempts:
            events = await self._attempt(request, plan)
            generated += len(events)
            attempts.record(plan, events, verdict(events, self.gate))
        return self._finish(attempts, generated)
