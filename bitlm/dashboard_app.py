"""The playground for one model without Ray: ``run_dashboard(host, port)``.

It serves the same page as the Ray Serve application (bitlm/static/playground.html) and the
part of its API the page uses: ``POST /v1/completions`` (streamed or not, gated, with per-byte
K/C/S in the ``bitlm`` extension field), ``GET /v1/models`` and ``GET /health``. Standard
library HTTP server, one thread per request.
"""

from __future__ import annotations

import codecs
import json
import os
import threading
import time
import uuid
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from .serving import GateSettings, complete, parity_status, stream_bytes

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"
DEFAULT_CHECKPOINT = "runs/demo/final_checkpoint"


def _load_model(model=None, checkpoint: str | None = None):
    from .model import BitTransformerLM

    if model is not None:
        return model.eval()
    checkpoint = checkpoint or os.environ.get("BITLM_CHECKPOINT") or DEFAULT_CHECKPOINT
    if Path(checkpoint).exists():
        return BitTransformerLM.from_pretrained(checkpoint).eval()
    warnings.warn(f"no checkpoint at {checkpoint}: serving an untrained model", stacklevel=3)
    return BitTransformerLM(d_model=64, nhead=4, num_layers=2, dim_feedforward=128, max_seq_len=1152).eval()


def _validate(body: Any, max_tokens_limit: int) -> dict[str, Any]:
    """The completion request, or ValueError naming what is wrong (answered with 400)."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("prompt must be a non-empty string")
    out = {"prompt": prompt.encode("utf-8"), "stream": body.get("stream", False), "seed": body.get("seed")}
    for key, default, low, high in (
        ("max_tokens", 16, 1, max_tokens_limit),
        ("temperature", 1.0, 0, 2),
        ("top_p", 1.0, 1e-9, 1),
    ):
        value = body.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (key == "max_tokens" and not isinstance(value, int))
        ):
            raise ValueError(f"{key} must be a number" + (" (an integer)" if key == "max_tokens" else ""))
        if not low <= value <= high:
            raise ValueError(f"{key} must be between {low} and {high}, got {value}")
        out[key] = value
    if out["seed"] is not None and (isinstance(out["seed"], bool) or not isinstance(out["seed"], int)):
        raise ValueError("seed must be an integer")
    if not isinstance(out["stream"], bool):
        raise ValueError("stream must be true or false")
    return out


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
                self._json(
                    200,
                    {"object": "list", "data": [{"id": "bitlm", "object": "model", "created": 0, "owned_by": "bitlm"}]},
                )
            else:
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found_error"}})

        def do_POST(self) -> None:
            if self.path != "/v1/completions":
                self._json(404, {"error": {"message": f"no route {self.path}", "type": "not_found_error"}})
                return
            try:
                length = int(self.headers.get("Content-Length", 0))
                req = _validate(json.loads(self.rfile.read(length) or b"null"), max_tokens)
            except (ValueError, json.JSONDecodeError) as e:
                self._json(400, {"error": {"message": str(e), "type": "invalid_request_error"}})
                return
            rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
            with busy:
                if req["stream"]:
                    self._stream(req, rid, created)
                else:
                    done = complete(
                        model, req["prompt"], req["max_tokens"], req["temperature"], req["top_p"], req["seed"], gate
                    )
                    self._json(
                        200,
                        {
                            "id": rid,
                            "object": "text_completion",
                            "created": created,
                            "model": "bitlm",
                            "choices": [
                                {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None}
                            ],
                            "usage": {
                                "prompt_tokens": len(req["prompt"]),
                                "completion_tokens": len(done.data),
                                "total_tokens": len(req["prompt"]) + len(done.data),
                            },
                            "bitlm": {
                                "telemetry": done.summary(),
                                "gate": {"passed": done.finish_reason != "content_filter", "attempts": done.attempts},
                                "parity": parity_status(done.bits),
                            },
                        },
                    )

        def _stream(self, req: dict[str, Any], rid: str, created: int) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            events, finish = [], "length"
            for event in stream_bytes(
                model, req["prompt"], req["max_tokens"], req["temperature"], req["top_p"], req["seed"], gate
            ):
                if event.blocked:
                    finish = "content_filter"
                    break
                events.append(event)
                self._send(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": "bitlm",
                        "choices": [{"index": 0, "text": decoder.decode(bytes([event.byte])), "finish_reason": None}],
                        "bitlm": {"bytes": [{"index": event.index, "K": event.K, "C": event.C, "S": event.S}]},
                    }
                )
            last = events[-1] if events else None
            verdict = {
                "passed": finish != "content_filter",
                "C": last.C if last else 0.0,
                "S": last.S if last else 0.0,
                "attempts": [{"attempt": 0, "strategy": "sample"}],
            }
            self._send(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": "bitlm",
                    "choices": [{"index": 0, "text": decoder.decode(b"", final=True), "finish_reason": finish}],
                    "bitlm": {"gate": verdict},
                }
            )
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            self.close_connection = True

        def _send(self, payload: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

    return ThreadingHTTPServer((host, port), Handler)


def run_dashboard(host: str = "127.0.0.1", port: int = 5000, model=None, checkpoint: str | None = None) -> None:
    """Serve the playground for one model until interrupted (the guide's entry point)."""
    server = make_server(host, port, model, checkpoint)
    print(f"bitlm playground on http://{host}:{port}/")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
