"""Ray Serve application: a quantized BitTransformerLM behind the safety gate over HTTP.

    serve run serve/config.yaml                       # 127.0.0.1:8000, settings from the file
    serve run serve.app:build checkpoint=runs/.../final_checkpoint quantization=int8

Two deployments: ``BitLMModel`` (serve/deployment.py) loads a checkpoint (a local directory,
or an MLflow URI such as ``runs:/<id>/checkpoint`` or ``models:/<name>/<version>``), quantizes
it (``int8`` by default, ``none`` or ``4bit``) and generates through bitlm's gated loop.
``Ingress`` (here) is a FastAPI app (OpenAPI at /docs) speaking serve/protocol.py:

- ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``: OpenAI-compatible,
  streamed (server-sent events ending in ``data: [DONE]``, ``stream_options.include_usage``)
  or not. A blocked generation answers ``finish_reason: "content_filter"`` with no text.
- ``POST /generate``: text or bits in; text, bits, per-byte K/C/S, parity status and verdict out.
- ``GET /health``, ``GET /`` (the playground page).

Bad input gets a 4xx with an OpenAI-style error body, never a 5xx. Prometheus metrics
(requests, bytes generated, latency, gate blocks by metric) are served on Ray's metrics export
port (pinned by serve/run.py and documented in the README).
"""

import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.auth import DEFAULT_EXEMPT, UNAUTHORIZED, Access, install, installed
from serve.deployment import BitLMModel
from serve.protocol import SSE, Limits, chat_prompt, check_request, completion_body
from serve.schemas import ERRORS, APIError, ChatRequest, CompletionRequest, GenerateRequest, validation_error

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"

app = FastAPI(title="bitlm", version="0.1.0", description="BitTransformerLM behind the safety gate. A token is a byte.")


def _error(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(validation_error(exc.errors()))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (an unparseable body, an unknown route) in the API's error shape."""
    return _error(APIError(exc.status_code, str(exc.detail)))


@app.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return _error(exc)


@app.exception_handler(BackPressureError)
async def _busy(request: Request, exc: BackPressureError) -> JSONResponse:
    """The model's queue is full (serve/config.yaml: max_queued_requests): come back shortly."""
    body = APIError(503, "the model's request queue is full; retry after the Retry-After seconds", code="overloaded")
    return JSONResponse(body.body(), status_code=503, headers={"Retry-After": "1"})


class _Access:
    """The optional API key (serve/auth.py), before any route runs. Plain ASGI: Starlette's
    ``@app.middleware("http")`` runs every request through a second task and memory streams,
    which this check does not need."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        access = installed()  # this replica's (Ingress.__init__ installs it)
        if scope["type"] != "http" or not access.enabled:
            return await self.app(scope, receive, send)
        request = Request(scope)
        key = request.query_params.get("key")
        if key is not None and request.method == "GET":
            cookie = access.login_cookie(key)
            if cookie is not None:  # a browser opening a page with ?key=: remember it, drop it from the URL
                page = str(request.url.remove_query_params("key"))
                return await RedirectResponse(page, 303, {"Set-Cookie": cookie})(scope, receive, send)
        path, root = scope["path"], scope.get("root_path", "")
        path = (path[len(root) :] or "/") if root and path.startswith(root) else path  # the app's own route
        if not access.allows(path, request.headers.get("authorization"), request.headers.get("cookie")):
            denied = JSONResponse(UNAUTHORIZED, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await denied(scope, receive, send)
        await self.app(scope, receive, send)


app.add_middleware(_Access)


def _request(prompt: bytes, max_new: int, temperature: float, top_p: float, seed: int | None) -> dict[str, Any]:
    return {"prompt": prompt, "max_new_bytes": max_new, "temperature": temperature, "top_p": top_p, "seed": seed}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(
        self,
        model: DeploymentHandle,
        model_name: str = "bitlm",
        max_prompt_bytes: int = 2048,
        max_tokens: int = 512,
        access: Access | None = None,
    ):
        from ray.serve.metrics import Counter, Histogram

        install(access or Access())
        self.model = model
        self.limits = Limits(model_name, max_prompt_bytes, max_tokens)
        self.requests = Counter("bitlm_requests_total", description="HTTP requests", tag_keys=("route", "status"))
        self.latency = Histogram(
            "bitlm_request_latency_ms",
            description="Request latency",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
            tag_keys=("route",),
        )

    def _observe(self, route: str, status: int, start: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe((time.perf_counter() - start) * 1000, tags={"route": route})

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/health")
    async def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.limits.model_name, **(await self.model.info.remote())}

    @app.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        card = {"id": self.limits.model_name, "object": "model", "created": 0, "owned_by": "bitlm"}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(self, body: CompletionRequest):
        return await self._openai("text_completion", body, body.prompt, body.max_tokens)

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat(self, body: ChatRequest):
        max_tokens = body.max_completion_tokens or body.max_tokens or 64
        return await self._openai("chat.completion", body, chat_prompt(body.messages), max_tokens)

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
        check_request(self.limits, self.limits.model_name, prompt, body.max_new_bytes, body.temperature, body.top_p)
        request = _request(prompt, body.max_new_bytes, body.temperature, body.top_p, body.seed)
        result = await self.model.complete.remote(request)
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

    async def _openai(self, kind: str, body, prompt_text: str, max_tokens: int):
        start = time.perf_counter()
        prompt = prompt_text.encode("utf-8")
        check_request(self.limits, body.model, prompt, max_tokens, body.temperature, body.top_p, body.n)
        stops = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        request = _request(prompt, max_tokens, body.temperature, body.top_p, body.seed)
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            sse = SSE(kind, rid, created, self.limits.model_name, len(prompt), stops, usage)
            return StreamingResponse(self._sse(sse, request, start), media_type="text/event-stream")
        result = await self.model.complete.remote(request)
        self._observe(kind, 200, start)
        return completion_body(kind, rid, created, self.limits.model_name, result, len(prompt), stops)

    async def _sse(self, sse: SSE, request: dict, start: float):
        for line in sse.start():
            yield line
        result = None
        try:
            async for event in self.model.options(stream=True).stream.remote(request):
                if event["type"] == "done":
                    result = event
                    break
                for line in sse.byte(event):
                    yield line
                if sse.done:
                    break
        except Exception as e:  # noqa: BLE001 - the replica died or failed mid-stream: say so, in-band
            for line in sse.error(
                f"generation failed mid-stream ({type(e).__name__}); retry the request", "replica_failed"
            ):
                yield line
            self._observe(sse.chunk_kind, 500, start)
            return
        for line in sse.end(result):
            yield line
        self._observe(sse.chunk_kind, 200, start)


def build(args: dict[str, Any]):
    """The application from flat arguments (``serve run serve.app:build checkpoint=...``)."""
    checkpoint = args.get("checkpoint")
    if not checkpoint:
        raise ValueError("serve.app:build needs checkpoint=<directory or MLflow URI>")
    model = BitLMModel.options(user_config={"gate": args.get("gate", {})}).bind(
        checkpoint,
        str(args.get("quantization", "int8")),
        int(args.get("max_batch_size", 16)),
        float(args.get("batch_wait_timeout_s", 0.01)),
        args.get("tracking_uri"),
    )
    exempt = args.get("auth_exempt", list(DEFAULT_EXEMPT))
    access = Access.from_key(args.get("api_key"), exempt)  # default: the driver's BITLM_API_KEY; its digest travels
    return Ingress.bind(
        model,
        str(args.get("model_name", "bitlm")),
        int(args.get("max_prompt_bytes", 2048)),
        int(args.get("max_tokens", 512)),
        access,
    )
