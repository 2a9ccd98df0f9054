"""Ray Serve application: a quantized BitTransformerLM behind the safety gate over HTTP.

    serve run serve/config.yaml                       # 127.0.0.1:8000, settings from the file
    serve run serve.app:build checkpoint=runs/.../final_checkpoint quantization=int8

Two deployments: ``BitLMModel`` loads a checkpoint (a local directory, or an MLflow URI such as
``runs:/<id>/checkpoint`` or ``models:/<name>/<version>``), quantizes it (``int8`` by default,
``none`` or ``4bit``) and generates with the KV cache, batching concurrent requests
(``@serve.batch``, streaming included) and gating every generation (bitlm.serving). The gate's
settings are the deployment's ``user_config``, so they change without a restart. ``Ingress``
is a FastAPI app (OpenAPI at /docs):

- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible,
  streamed (server-sent events ending in ``data: [DONE]``, ``stream_options.include_usage``)
  or not. A token is a byte; ``usage`` counts bytes. A blocked generation answers
  ``finish_reason: "content_filter"`` with no text. Every answer carries an extension field
  ``bitlm`` with the K/C/S telemetry and the gate's verdict.
- ``POST /generate``: text or bits in; text, bits, per-byte K/C/S, parity status and verdict out.
- ``GET /health``, ``GET /`` (the playground page).

Bad input gets a 4xx with an OpenAI-style error body, never a 5xx. Prometheus metrics
(requests, bytes generated, latency, gate blocks by metric) are served on Ray's metrics export
port (pinned by serve/run.py and documented in the README).
"""

import asyncio
import codecs
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

# No "from __future__ import annotations" here: it breaks FastAPI's handling of the routes'
# request models under @serve.ingress (bodies become query parameters).

Number = StrictInt | StrictFloat


# -- request and response schemas --------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: StrictStr
    max_tokens: StrictInt = Field(16, description="new bytes to generate")
    temperature: Number = Field(1.0, description="0 (greedy) to 2")
    top_p: Number = Field(1.0, description="in (0, 1]")
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    stop: StrictStr | list[StrictStr] | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: StrictStr | None = Field(None, description="prompt text (or give bits)")
    bits: list[StrictInt] | None = Field(None, description="parity-encoded prompt bits, 9 per byte")
    max_new_bytes: StrictInt = 32
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: StrictInt | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {
    400: {
        "model": ErrorResponse,
        "description": "Invalid request: wrong type, out-of-range value, empty prompt, malformed JSON",
    },
    404: {"model": ErrorResponse, "description": "Unknown model"},
    408: {"description": "The request took longer than the server's request timeout"},
    413: {"model": ErrorResponse, "description": "Prompt longer than the configured limit"},
    503: {"description": "Too many queued requests (the configured queue length)"},
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


# -- the model deployment -----------------------------------------------------------------------


def load_checkpoint(checkpoint: str, tracking_uri: str | None = None):
    """A BitTransformerLM from a directory or an MLflow runs:/ or models:/ URI."""
    from bitlm import BitTransformerLM

    if checkpoint.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        checkpoint = mlflow.artifacts.download_artifacts(artifact_uri=checkpoint)
    return BitTransformerLM.from_pretrained(checkpoint).eval()


def quantize(model, mode: str):
    from bitlm.quantization import convert_qat_fx, prepare_qat_fx, quantize_dynamic

    if mode == "none":
        return model
    if mode == "int8":
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
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.01,
        tracking_uri: str | None = None,
        threads: int = 1,
    ):
        from ray.serve.metrics import Counter

        from bitlm.serving import GateSettings

        torch.set_num_threads(threads)
        self.model = quantize(load_checkpoint(checkpoint, tracking_uri), quantization)
        self.arch = self.model.config.arch
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
        from bitlm.serving import GateSettings

        self.gate = GateSettings(**(user_config or {}).get("gate", {}))

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
        }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _stream_batch(self, requests: list[dict[str, Any]]):
        """One decoding loop for all the requests of a batch: requests whose prompts have the
        same length share forward passes; the others run side by side, step by step."""
        from bitlm.serving import stream_batch

        self.batch_sizes.append(len(requests))
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(len(r["prompt"]), []).append(i)
        iterators = {
            length: stream_batch(
                self.model,
                [requests[i]["prompt"] for i in idx],
                [requests[i]["max_new_bytes"] for i in idx],
                [float(requests[i]["temperature"]) for i in idx],
                [float(requests[i]["top_p"]) for i in idx],
                [requests[i].get("seed") for i in idx],
                self.gate,
            )
            for length, idx in groups.items()
        }
        finished = [False] * len(requests)
        while not all(finished):
            out: list[Any] = [StopIteration] * len(requests)
            for length, idx in groups.items():
                events = await asyncio.to_thread(next, iterators[length], None)  # compute off the event loop
                for j, i in enumerate(idx):
                    event = events[j] if events is not None else None
                    if event is None:
                        finished[i] = True
                    else:
                        out[i] = event.as_dict()
            if not all(finished) or any(o is not StopIteration for o in out):
                yield out

    async def stream(self, request: dict[str, Any]):
        """Byte events of one request (through the batcher), then a final verdict event."""
        events = []
        async for event in self._stream_batch(request):
            events.append(event)
            self.bytes_counter.inc()
            yield {"type": "byte", **event}
        yield {
            "type": "done",
            **self._verdict(
                events, [{"attempt": 0, "strategy": "sample", "blocked": bool(events and events[-1]["blocked"])}]
            ),
        }

    async def complete(self, request: dict[str, Any]) -> dict[str, Any]:
        """A whole generation: the first attempt through the batcher, retries by the gate's
        strategy when it is blocked."""
        from bitlm.serving import complete as complete_alone

        events = [e async for e in self._stream_batch(request)]
        blocked = bool(events and events[-1]["blocked"])
        attempts = [
            {
                "attempt": 0,
                "strategy": "sample",
                "blocked": blocked,
                "bytes": len(events),
                "failed": events[-1]["failed"] if blocked else {},
            }
        ]
        if blocked and self.gate.max_retries:
            retry_gate = type(self.gate)(**{**self.gate.__dict__, "max_retries": self.gate.max_retries - 1})
            seed = None if request.get("seed") is None else request["seed"] + 1
            done = await asyncio.to_thread(
                complete_alone,
                self.model,
                request["prompt"],
                request["max_new_bytes"],
                float(request["temperature"]) + 0.25,
                float(request["top_p"]),
                seed,
                retry_gate,
            )
            for a in done.attempts:
                attempts.append(
                    {
                        **a,
                        "attempt": a["attempt"] + 1,
                        "strategy": self.gate.retry_strategy if a["attempt"] == 0 else a["strategy"],
                    }
                )
            events = [e.as_dict() for e in done.events]
        self.bytes_counter.inc(len(events))
        return {"events": events, **self._verdict(events, attempts)}

    def _verdict(self, events: list[dict[str, Any]], attempts: list[dict[str, Any]]) -> dict[str, Any]:
        from bitlm.serving import parity_status

        blocked = attempts[-1]["blocked"]
        failed = attempts[-1].get("failed") or (events[-1]["failed"] if events and events[-1]["blocked"] else {})
        if blocked:
            for metric in failed or {"unknown": 0}:
                self.blocks_counter.inc(tags={"metric": metric})
        kept = [] if blocked else events
        bits = [b for e in kept for b in e["bits"]]
        n = max(1, len(events))
        return {
            "data": bytes(e["byte"] for e in kept),
            "finish_reason": "content_filter" if blocked else "length",
            "telemetry": {
                "K": sum(e["K"] for e in events) / n if events else None,
                "C": events[-1]["C"] if events else None,
                "S": events[-1]["S"] if events else None,
            },
            "gate": {
                "passed": not blocked,
                "failed": failed,
                "attempts": attempts,
                "C": events[-1]["C"] if events else None,
                "S": events[-1]["S"] if events else None,
                **self.gate.__dict__,
            },
            "parity": parity_status(bits),
            "bits": bits,
        }


# -- the HTTP ingress ----------------------------------------------------------------------------

app = FastAPI(title="bitlm", version="0.1.0", description="BitTransformerLM behind the safety gate. A token is a byte.")


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return _error(400, f"malformed JSON body: {first.get('msg', 'cannot parse')}", code="json_invalid")
    loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
    return _error(
        400, f"{loc or 'body'}: {first.get('msg', 'invalid value')}", param=loc or None, code=first.get("type")
    )


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (an unparseable body, an unknown route) in the API's error shape."""
    return _error(exc.status_code, str(exc.detail))


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc.status, exc.message, exc.param, exc.code)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(
        self, model: DeploymentHandle, model_name: str = "bitlm", max_prompt_bytes: int = 2048, max_tokens: int = 512
    ):
        from ray.serve.metrics import Counter, Histogram

        self.model, self.model_name = model, model_name
        self.max_prompt_bytes, self.max_tokens = max_prompt_bytes, max_tokens
        self.page = Path(__file__).resolve().parent.parent / "bitlm" / "static" / "playground.html"
        if not self.page.exists():
            import bitlm

            self.page = Path(bitlm.__file__).parent / "static" / "playground.html"
        self.requests = Counter("bitlm_requests_total", description="HTTP requests", tag_keys=("route", "status"))
        self.latency = Histogram(
            "bitlm_request_latency_ms",
            description="Request latency",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
            tag_keys=("route",),
        )

    # -- validation ---------------------------------------------------------------------

    def _check(self, model: str, prompt: bytes, max_tokens: int, temperature: float, top_p: float, n: int) -> None:
        if model != self.model_name:
            raise APIError(
                404, f"model {model!r} does not exist; this server has {self.model_name!r}", "model", "model_not_found"
            )
        if not prompt:
            raise APIError(400, "the prompt is empty: give at least one byte of text", "prompt", "empty_prompt")
        if len(prompt) > self.max_prompt_bytes:
            raise APIError(
                413,
                f"prompt is {len(prompt)} bytes; this server takes at most {self.max_prompt_bytes}",
                "prompt",
                "prompt_too_long",
            )
        if not 1 <= max_tokens <= self.max_tokens:
            raise APIError(400, f"max_tokens must be between 1 and {self.max_tokens}, got {max_tokens}", "max_tokens")
        if not 0 <= temperature <= 2:
            raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
        if not 0 < top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
        if n != 1:
            raise APIError(400, f"n must be 1 (one choice per request), got {n}", "n")

    def _observe(self, route: str, status: int, start: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe((time.perf_counter() - start) * 1000, tags={"route": route})

    # -- routes --------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(self.page.read_text())

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.model_name, **(await self.model.info.remote())}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "bitlm"}],
        }

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(self, body: CompletionRequest):
        return await self._openai("text_completion", body, body.prompt, body.max_tokens)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(self, body: ChatRequest):
        prompt = "".join(f"{m.role}: {m.content}\n" for m in body.messages) + "assistant: "
        if not body.messages:
            raise APIError(400, "messages is empty: give at least one message", "messages")
        max_tokens = body.max_completion_tokens or body.max_tokens or 64
        return await self._openai("chat.completion", body, prompt, max_tokens)

    @app.post("/generate", responses=ERRORS)
    async def generate(self, body: GenerateRequest) -> dict[str, Any]:
        from bitlm.bits import ParityError, bits_to_bytes

        start = time.perf_counter()
        if (body.text is None) == (body.bits is None):
            raise APIError(400, "give exactly one of text or bits", "text")
        if body.bits is not None:
            if len(body.bits) % 9 or any(b not in (0, 1) for b in body.bits):
                raise APIError(400, "bits must be 0/1 values, 9 per byte (8 data bits + parity)", "bits")
            try:
                prompt = bits_to_bytes(body.bits)
            except ParityError as e:
                raise APIError(400, str(e), "bits", "parity_error") from None
        else:
            prompt = body.text.encode("utf-8")
        self._check(self.model_name, prompt, body.max_new_bytes, body.temperature, body.top_p, 1)
        result = await self.model.complete.remote(
            self._request(prompt, body.max_new_bytes, body.temperature, body.top_p, body.seed)
        )
        self._observe("/generate", 200, start)
        return {
            "text": result["data"].decode("utf-8", errors="replace"),
            "bits": result["bits"],
            "bytes": [{k: e[k] for k in ("index", "byte", "K", "C", "S")} for e in result["events"]],
            "parity": result["parity"],
            "telemetry": result["telemetry"],
            "gate": result["gate"],
            "finish_reason": result["finish_reason"],
        }

    # -- OpenAI protocol -------------------------------------------------------------------

    @staticmethod
    def _request(prompt: bytes, max_new: int, temperature: float, top_p: float, seed: int | None) -> dict[str, Any]:
        return {"prompt": prompt, "max_new_bytes": max_new, "temperature": temperature, "top_p": top_p, "seed": seed}

    async def _openai(self, kind: str, body, prompt_text: str, max_tokens: int):
        start = time.perf_counter()
        prompt = prompt_text.encode("utf-8")
        self._check(body.model, prompt, max_tokens, body.temperature, body.top_p, body.n)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        request = self._request(prompt, max_tokens, body.temperature, body.top_p, body.seed)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = self._sse(kind, rid, created, request, len(prompt), stops, usage)
            return StreamingResponse(stream, media_type="text/event-stream")
        result = await self.model.complete.remote(request)
        text = result["data"].decode("utf-8", errors="replace")
        finish = result["finish_reason"]
        for stop in stops:
            if stop and stop in text:
                text, finish = text[: text.index(stop)], "stop"
                break
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        if kind == "chat.completion":
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        n_out = len(result["data"])
        self._observe(kind, 200, start)
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": self.model_name,
            "choices": [choice],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out},
            "bitlm": {"telemetry": result["telemetry"], "gate": result["gate"], "parity": result["parity"]},
        }

    async def _sse(
        self, kind: str, rid: str, created: int, request: dict, n_prompt: int, stops: list[str], usage: bool
    ):
        start = time.perf_counter()
        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        sent, n_out, finish, verdict = "", 0, "length", None

        def chunk(text: str | None, finish_reason: str | None, extra: dict | None = None, role: bool = False) -> str:
            if kind == "chat.completion":
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            body = {"id": rid, "object": chunk_kind, "created": created, "model": self.model_name, "choices": [choice]}
            if extra:
                body["bitlm"] = extra
            return f"data: {json.dumps(body)}\n\n"

        if kind == "chat.completion":
            yield chunk("", None, role=True)
        async for event in self.model.options(stream=True).stream.remote(request):
            if event["type"] == "done":
                verdict = event
                break
            if event["blocked"]:
                finish = "content_filter"
                continue  # the byte that tripped the gate is withheld
            n_out += 1
            text = decoder.decode(bytes([event["byte"]]))
            stats = {"bytes": [{k: event[k] for k in ("index", "K", "C", "S")}]}
            stopped = next((s for s in stops if s and s in sent + text), None)
            if stopped:
                cut = (sent + text).index(stopped)
                yield chunk((sent + text)[len(sent) : cut], None, stats)
                finish = "stop"
                break
            sent += text
            yield chunk(text, None, stats)
        tail = decoder.decode(b"", final=True)
        extra = {"gate": None, "telemetry": None}
        if verdict is not None:
            finish = verdict["finish_reason"] if finish != "stop" else finish
            extra = {"gate": verdict["gate"], "telemetry": verdict["telemetry"], "parity": verdict["parity"]}
        yield chunk(tail if finish != "content_filter" else "", finish, extra)
        if usage:
            body = {
                "id": rid,
                "object": chunk_kind,
                "created": created,
                "model": self.model_name,
                "choices": [],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
            }
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"
        self._observe(chunk_kind, 200, start)


# -- building the application ------------------------------------------------------------------


def build(args: dict[str, Any]):
    """The application from flat arguments (``serve run serve.app:build checkpoint=...``)."""
    checkpoint = args.get("checkpoint")
    if not checkpoint:
        raise ValueError("serve.app:build needs checkpoint=<directory or MLflow URI>")
    model = BitLMModel.options(user_config={"gate": args.get("gate", {})}).bind(
        checkpoint,
        str(args.get("quantization", "int8")),
        int(args.get("max_batch_size", 8)),
        float(args.get("batch_wait_timeout_s", 0.01)),
        args.get("tracking_uri"),
    )
    return Ingress.bind(
        model,
        str(args.get("model_name", "bitlm")),
        int(args.get("max_prompt_bytes", 2048)),
        int(args.get("max_tokens", 512)),
    )
