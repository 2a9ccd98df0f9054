"""The dashboard without Ray: ``run_dashboard(host, port)`` (the guide's entry point, also
``python unified_workflow.py --dashboard`` and ``bitlm.dashboard_app.run_dashboard``).

It serves the playground page (serve/static/playground.html) and the part of the HTTP API the
page uses, ``POST /v1/completions`` (streamed or not), ``GET /v1/models`` and ``GET /health``,
with the same schemas, checks, bodies and stream chunks as the Ray Serve application
(serve/schemas.py, serve/protocol.py), for one model in this process. Standard library HTTP
server, one thread per request, bound to 127.0.0.1 unless told otherwise.
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

from pydantic import ValidationError

from bitlm import BitTransformerLM
from bitlm.gated import Attempts, GateSettings, complete, stream_bytes
from serve.protocol import SSE, Limits, check_request, completion_body, verdict
from serve.schemas import APIError, CompletionRequest, validation_error

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"
DEFAULT_CHECKPOINT = "runs/demo/final_checkpoint"


def _load_model(model=None, checkpoint: str | None = None):
    if model is not None:
        return model.eval()
    checkpoint = checkpoint or os.environ.get("BITLM_CHECKPOINT") or DEFAULT_CHECKPOINT
    if Path(checkpoint).exists():
        return BitTransformerLM.from_pretrained(checkpoint).eval()
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


def make_server(
    host: str = "127.0.0.1",
    port: int = 5000,
    model=None,
    checkpoint: str | None = None,
    gate: GateSettings | None = None,
    max_tokens: int = 512,
) -> ThreadingHTTPServer:
    """The dashboard's HTTP server, not yet serving (call ``serve_forever``)."""
    model = _load_model(model, checkpoint)
    gate = gate or GateSettings()
    gate.check_model(model)
    limits = Limits("bitlm", 2048, max_tokens)
    busy = threading.Lock()  # one model: generations take turns

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:  # quiet by default
            pass

        def _json(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/":
                data = PAGE.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            elif self.path == "/health":
                self._json(200, {"status": "ok", "arch": model.config.arch})
            elif self.path == "/v1/models":
                card = {"id": limits.model_name, "object": "model", "created": 0, "owned_by": "bitlm"}
                self._json(200, {"object": "list", "data": [card]})
            else:
                self._json(404, APIError(404, f"no route {self.path}").body())

        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                self._json(404, APIError(404, f"no route {self.path}").body())
                return
            try:
                req = _parse(self.rfile.read(int(self.headers.get("Content-Length", 0))), limits)
            except APIError as e:
                self._json(e.status, e.body())
                return
            rid, created, prompt = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.prompt.encode("utf-8")
            stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
            with busy:
                if req.stream:
                    usage = bool(req.stream_options and req.stream_options.include_usage)
                    self._stream(
                        req, SSE("text_completion", rid, created, limits.model_name, len(prompt), stops, usage)
                    )
                    return
                done = complete(model, prompt, req.max_tokens, req.temperature, req.top_p, req.seed, gate)
                result = verdict(done, gate)
                self._json(
                    200, completion_body("text_completion", rid, created, limits.model_name, result, len(prompt), stops)
                )

        def _stream(self, req: CompletionRequest, sse: SSE) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            attempts = Attempts(gate, req.temperature, req.seed, max_retries=0)
            plan = next(iter(attempts))
            events = []
            for line in sse.start():
                self._send(line)
            for event in stream_bytes(
                model, req.prompt.encode("utf-8"), req.max_tokens, plan.temperature, req.top_p, plan.seed, gate
            ):
                events.append(event)
                for line in sse.byte(event.as_dict()):
                    self._send(line)
                if sse.done:
                    break
            attempts.record(plan, events)
            for line in sse.end(verdict(attempts.completion(), gate)):
                self._send(line)
            self.close_connection = True

        def _send(self, line: str) -> None:
            self.wfile.write(line.encode())
            self.wfile.flush()

    return ThreadingHTTPServer((host, port), Handler)


def run_dashboard(host: str = "127.0.0.1", port: int = 5000, model=None, checkpoint: str | None = None) -> None:
    """Serve the dashboard for one model until interrupted."""
    server = make_server(host, port, model, checkpoint)
    print(f"bitlm dashboard on http://{host}:{port}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
