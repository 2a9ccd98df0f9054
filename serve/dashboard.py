"""The dashboard: ``run_dashboard(host, port)`` (the guide's entry point, also
``python unified_workflow.py --dashboard`` and ``bitlm.dashboard_app.run_dashboard``).

One page (serve/static/dashboard.html), one server, the guide's five functions:

- **training monitoring**: the MLflow experiment's runs, running and finished, with their curves
  (bits/byte, validation bits/byte, K, C, S), refreshed while they run;
- **telemetry visualization**: per-byte K, C, S of a prompt and the model's continuation, and the
  attention maps of every layer;
- **configuration controls**: start a training run (a shipped config plus ``key=value``
  overrides; pipelines/train.py on Ray, logging to the same store) and follow it;
- **checkpoint management**: list local checkpoints and registered MLflow models, load one into
  the dashboard, export one as a zip, import a zip, register a local one in MLflow;
- **safe inference**: the playground (``/playground``, also embedded), speaking the same
  ``/v1/completions`` as the Ray Serve application (serve/schemas.py, serve/protocol.py).

Standard library HTTP server, one thread per request, bound to 127.0.0.1 unless told otherwise.
"""

import json
import os
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from pydantic import ValidationError

from bitlm import BitTransformerLM
from bitlm.gated import Attempts, GateSettings, complete, stream_bytes
from serve import dashboard_api as api
from serve.auth import UNAUTHORIZED, Access
from serve.protocol import SSE, Limits, answer, check_request, completion_body
from serve.schemas import APIError, CompletionRequest, validation_error

STATIC = Path(__file__).resolve().parent / "static"
PAGES = {"/": "dashboard.html", "/playground": "playground.html"}
DEFAULT_CHECKPOINT = "runs/demo/final_checkpoint"
MAX_BODY = 256 * 1024 * 1024  # an imported checkpoint zip


def _load_model(model=None, checkpoint: str | None = None):
    if model is not None:
        return model.eval()
    checkpoint = checkpoint or os.environ.get("BITLM_CHECKPOINT") or DEFAULT_CHECKPOINT
    if Path(checkpoint).exists() or "://" in checkpoint or checkpoint.startswith(("models:/", "runs:/")):
        return api.load(checkpoint)
    warnings.warn(f"no checkpoint at {checkpoint}: serving an untrained model", stacklevel=3)
    return BitTransformerLM(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, max_seq_len=1152).eval()


def _parse(raw: bytes, limits: Limits) -> CompletionRequest:
    """The completion request, or APIError (400/404/413) naming what is wrong."""
    try:
        body = CompletionRequest.model_validate_json(raw or b"null")
    except ValidationError as e:
        raise validation_error(e.errors()) from None
    check_request(
        limits, body.model, body.prompt.encode("utf-8"), body.max_tokens, body.temperature, body.top_p, body.n
    )
    return body


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"malformed JSON body: {e}", code="json_invalid") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


def _field(body: dict, key: str, kind: type, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is None or (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise APIError(400, f"{key} must be a {kind.__name__}", key)
    return value


class Dashboard:
    """The dashboard's state: the model it serves (which checkpoint management can swap), its
    gate, and the training jobs it started."""

    def __init__(self, model, source: str, gate: GateSettings, max_tokens: int, experiment: str, runs_dir: Path):
        self.model, self.source, self.gate, self.runs_dir = model, source, gate, runs_dir
        self.limits = Limits("bitlm", 2048, max_tokens)
        self.experiment = experiment
        self.jobs = api.Jobs()
        self.busy = threading.Lock()  # one model: generations take turns

    def get(self, path: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        if path == "/health":
            return 200, {"status": "ok", "arch": self.model.config.arch, "checkpoint": self.source}
        if path == "/v1/models":
            return 200, {
                "object": "list",
                "data": [{"id": "bitlm", "object": "model", "created": 0, "owned_by": "bitlm"}],
            }
        if path == "/api/runs":
            return 200, {"runs": api.runs(self.experiment)}
        if path.startswith("/api/runs/") and path.endswith("/curves"):
            return 200, {"curves": api.curves(path.split("/")[3])}
        if path == "/api/configs":
            return 200, {"configs": api.configs()}
        if path == "/api/jobs":
            return 200, {"jobs": self.jobs.all()}
        if path == "/api/checkpoints":
            return 200, {**api.checkpoints(self.runs_dir), "loaded": self.source}
        raise APIError(404, f"no route {path}")

    def post(self, path: str, query: dict[str, list[str]], raw: bytes) -> tuple[int, Any]:
        if path == "/api/checkpoints/import":
            return 200, api.import_zip(self.runs_dir, (query.get("name") or [""])[0], raw)
        body = _json_body(raw)
        if path == "/api/telemetry":
            prompt = _field(body, "prompt", str)
            n = _field(body, "max_new_bytes", int, 48)
            if not 1 <= n <= 256:
                raise APIError(400, "max_new_bytes must be between 1 and 256", "max_new_bytes")
            with self.busy:
                return 200, api.telemetry(self.model, prompt, n, _field(body, "seed", int, 0))
        if path == "/api/train":
            overrides = _field(body, "overrides", list, [])
            return 200, self.jobs.start(_field(body, "config", str), [str(o) for o in overrides if str(o).strip()])
        if path == "/api/checkpoints/load":
            source = _field(body, "source", str)
            model = api.load(source)
            with self.busy:
                self.model, self.source = model, source
            return 200, {"loaded": source, "arch": model.config.arch, "parameters": model.num_parameters()}
        if path == "/api/models/register":
            return 200, api.register(_field(body, "path", str), _field(body, "name", str))
        raise APIError(404, f"no route {path}")


def make_server(
    host: str = "127.0.0.1",
    port: int = 5000,
    model=None,
    checkpoint: str | None = None,
    gate: GateSettings | None = None,
    max_tokens: int = 512,
    experiment: str = "bitlm",
    runs_dir: str | Path = "runs",
    api_key: str | None = None,
) -> ThreadingHTTPServer:
    """The dashboard's HTTP server, not yet serving (call ``serve_forever``). ``runs_dir`` is
    where it lists local checkpoints and puts imported ones. ``api_key`` (default: the
    environment's BITLM_API_KEY, none when unset) guards every route but /health
    (serve/auth.py): the dashboard can start training runs."""
    access = Access.from_key(api_key)
    source = (
        "in-process model"
        if model is not None
        else (checkpoint or os.environ.get("BITLM_CHECKPOINT") or DEFAULT_CHECKPOINT)
    )
    model = _load_model(model, checkpoint)
    dash = Dashboard(model, source, gate or GateSettings(), max_tokens, experiment, Path(runs_dir).resolve())
    dash.gate.check_model(dash.model)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
            pass

        def _send(self, status: int, data: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _json(self, status: int, payload: Any) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length", 0) or 0)
            if length > MAX_BODY:
                raise APIError(413, f"body of {length} bytes; at most {MAX_BODY}")
            return self.rfile.read(length)

        def _allowed(self, url) -> bool:
            """The API key check (serve/auth.py); answers 401 or the ?key= login itself."""
            key = (parse_qs(url.query).get("key") or [None])[0]
            cookie = access.login_cookie(key) if key is not None and self.command == "GET" else None
            if cookie is not None:
                self._send(303, b"", "text/plain", {"Location": url.path, "Set-Cookie": cookie})
                return False
            if access.allows(url.path, self.headers.get("Authorization"), self.headers.get("Cookie")):
                return True
            self._send(401, json.dumps(UNAUTHORIZED).encode(), "application/json", {"WWW-Authenticate": "Bearer"})
            return False

        def do_GET(self) -> None:
            url = urlparse(self.path)
            if not self._allowed(url):
                return
            try:
                if url.path in PAGES:
                    self._send(200, (STATIC / PAGES[url.path]).read_bytes(), "text/html; charset=utf-8")
                elif url.path == "/api/checkpoints/export":
                    path = (parse_qs(url.query).get("path") or [""])[0]
                    name = Path(path).name or "checkpoint"
                    headers = {"Content-Disposition": f'attachment; filename="{name}.zip"'}
                    self._send(200, api.export(path), "application/zip", headers)
                else:
                    self._json(*dash.get(url.path, parse_qs(url.query)))
            except APIError as e:
                self._json(e.status, e.body())

        def do_POST(self) -> None:
            url = urlparse(self.path)
            if not self._allowed(url):
                return
            try:
                raw = self._body()
                if url.path == "/v1/completions":
                    self._completion(_parse(raw, dash.limits))
                else:
                    self._json(*dash.post(url.path, parse_qs(url.query), raw))
            except APIError as e:
                self._json(e.status, e.body())

        def _completion(self, req: CompletionRequest) -> None:
            rid, created, prompt = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.prompt.encode("utf-8")
            stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
            with dash.busy:
                if req.stream:
                    usage = bool(req.stream_options and req.stream_options.include_usage)
                    self._stream(req, SSE("text_completion", rid, created, "bitlm", len(prompt), stops, usage))
                    return
                done = complete(dash.model, prompt, req.max_tokens, req.temperature, req.top_p, req.seed, dash.gate)
                result = answer(done, dash.gate)
                self._json(200, completion_body("text_completion", rid, created, "bitlm", result, len(prompt), stops))

        def _stream(self, req: CompletionRequest, sse: SSE) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            attempts = Attempts(dash.gate, req.temperature, req.seed, max_retries=0)
            plan = next(iter(attempts))
            events = []
            for line in sse.start():
                self._line(line)
            prompt = req.prompt.encode("utf-8")
            for event in stream_bytes(
                dash.model, prompt, req.max_tokens, plan.temperature, req.top_p, plan.seed, dash.gate
            ):
                events.append(event)
                for line in sse.byte(event.as_dict()):
                    self._line(line)
                if sse.done:
                    break
            attempts.record(plan, events)
            for line in sse.end(answer(attempts.completion(), dash.gate)):
                self._line(line)
            self.close_connection = True

        def _line(self, line: str) -> None:
            self.wfile.write(line.encode())
            self.wfile.flush()

    return ThreadingHTTPServer((host, port), Handler)


def run_dashboard(
    host: str = "127.0.0.1", port: int = 5000, model=None, checkpoint: str | None = None, api_key: str | None = None
) -> None:
    """Serve the dashboard until interrupted."""
    server = make_server(host, port, model, checkpoint, api_key=api_key)
    print(f"bitlm dashboard on http://{host}:{port}/ (playground: /playground)")
    if api_key or os.environ.get("BITLM_API_KEY"):
        print("API key on: open the page once as /?key=<key>; API clients send Authorization: Bearer <key>")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
