"""The OpenAI-compatible protocol over bitlm's gated generation (bitlm.gated): request checks,
response bodies and server-sent-event chunks. Pure functions and one small class, shared by the
Ray Serve ingress (serve/app.py) and the dashboard's server (serve/dashboard.py), so both answer
alike. A token is a byte; ``usage`` counts bytes. Every answer carries an extension field
``bitlm`` with the K/C/S telemetry and the gate's verdict.
"""

import codecs
import json
from dataclasses import asdict, dataclass
from typing import Any

from bitlm.gated import Completion, GateSettings, parity_status
from serve.schemas import APIError


@dataclass
class Limits:
    """What a server accepts."""

    model_name: str = "bitlm"
    max_prompt_bytes: int = 2048
    max_tokens: int = 512


def check_request(
    limits: Limits, model: str, prompt: bytes, max_tokens: int, temperature: float, top_p: float, n: int = 1
) -> None:
    """Raise APIError (404, 413 or 400, naming the field) for a request the server refuses."""
    if model != limits.model_name:
        raise APIError(
            404, f"model {model!r} does not exist; this server has {limits.model_name!r}", "model", "model_not_found"
        )
    if not prompt:
        raise APIError(400, "the prompt is empty: give at least one byte of text", "prompt", "empty_prompt")
    if len(prompt) > limits.max_prompt_bytes:
        raise APIError(
            413,
            f"prompt is {len(prompt)} bytes; this server takes at most {limits.max_prompt_bytes}",
            "prompt",
            "prompt_too_long",
        )
    if not 1 <= max_tokens <= limits.max_tokens:
        raise APIError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}", "max_tokens")
    if not 0 <= temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {temperature}", "temperature")
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {top_p}", "top_p")
    if n != 1:
        raise APIError(400, f"n must be 1 (one choice per request), got {n}", "n")


def chat_prompt(messages: list) -> str:
    """The text a chat request continues."""
    if not messages:
        raise APIError(400, "messages is empty: give at least one message", "messages")
    return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "


def answer(done: Completion, gate: GateSettings) -> dict[str, Any]:
    """What a gated generation returns over HTTP: the kept bytes and bits, per-byte events,
    finish reason, telemetry, the gate's verdict with its settings, and parity."""
    failed = done.attempts[-1]["failed"] if done.attempts else {}
    telemetry = {k: v if done.events else None for k, v in done.summary().items()}
    return {
        "data": done.data,
        "bits": done.bits,
        "events": [e.as_dict() for e in done.events],
        "finish_reason": done.finish_reason,
        "telemetry": telemetry,
        "gate": {
            "passed": done.passed,
            "failed": failed,
            "attempts": done.attempts,
            "C": telemetry["C"],
            "S": telemetry["S"],
            **asdict(gate),
        },
        "parity": parity_status(done.bits),
    }


def completion_body(
    kind: str, rid: str, created: int, model_name: str, result: dict[str, Any], n_prompt: int, stops: list[str]
) -> dict[str, Any]:
    """A non-streamed ``text_completion`` or ``chat.completion`` from an :func:`answer`."""
    text = result["data"].decode("utf-8", errors="replace")
    finish = result["finish_reason"]
    for stop in stops:
        if stop and stop in text:
            text, finish = text[: text.index(stop)], "stop"
            break
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if kind == "chat.completion":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    n_out = len(result["data"])
    return {
        "id": rid,
        "object": kind,
        "created": created,
        "model": model_name,
        "choices": [choice],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        "bitlm": {"telemetry": result["telemetry"], "gate": result["gate"], "parity": result["parity"]},
    }


class SSE:
    """The chunks of one streamed completion: ``start()``, then ``byte(event)`` per generated
    byte event (a dict of bitlm.gated.ByteEvent), then ``end(verdict)``; each returns the
    ``data: ...`` lines to send. A blocked byte is withheld and ends the text with
    ``content_filter``; a stop string ends it with ``stop`` (``done`` is then True)."""

    def __init__(
        self, kind: str, rid: str, created: int, model_name: str, n_prompt: int, stops: list[str], usage: bool
    ):
        self.kind, self.rid, self.created, self.model_name = kind, rid, created, model_name
        self.chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        self.n_prompt, self.stops, self.usage = n_prompt, stops, usage
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.sent, self.n_out, self.finish, self.done = "", 0, "length", False

    def _chunk(self, text: str | None, finish: str | None, extra: dict | None = None, role: bool = False) -> str:
        if self.kind == "chat.completion":
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        body = {"id": self.rid, "object": self.chunk_kind, "created": self.created, "model": self.model_name}
        body["choices"] = [choice]
        if extra:
            body["bitlm"] = extra
        return f"data: {json.dumps(body)}\n\n"

    def start(self) -> list[str]:
        return [self._chunk("", None, role=True)] if self.kind == "chat.completion" else []

    def byte(self, event: dict[str, Any]) -> list[str]:
        if event["blocked"]:
            self.finish = "content_filter"  # the byte that tripped the gate is withheld
            return []
        self.n_out += 1
        text = self.decoder.decode(bytes([event["byte"]]))
        stats = {"bytes": [{k: event[k] for k in ("index", "K", "C", "S")}]}
        stopped = next((s for s in self.stops if s and s in self.sent + text), None)
        if stopped:
            cut = (self.sent + text).index(stopped)
            self.finish, self.done = "stop", True
            return [self._chunk((self.sent + text)[len(self.sent) : cut], None, stats)]
        self.sent += text
        return [self._chunk(text, None, stats)]

    def error(self, message: str, code: str) -> list[str]:
        """The event that ends a stream the server could not finish: an OpenAI-style error
        object (the official client raises it), never a finish that looks like success."""
        body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
        return [f"data: {json.dumps(body)}\n\n"]

    def end(self, result: dict[str, Any] | None) -> list[str]:
        tail = self.decoder.decode(b"", final=True)
        extra: dict[str, Any] = {"gate": None, "telemetry": None}
        if result is not None:
            self.finish = result["finish_reason"] if self.finish != "stop" else self.finish
            extra = {"gate": result["gate"], "telemetry": result["telemetry"], "parity": result["parity"]}
        out = [self._chunk(tail if self.finish != "content_filter" else "", self.finish, extra)]
        if self.usage:
            usage = {"prompt_tokens": self.n_prompt, "completion_tokens": self.n_out}
            usage["total_tokens"] = self.n_prompt + self.n_out
            body = {"id": self.rid, "object": self.chunk_kind, "created": self.created, "model": self.model_name}
            out.append(f"data: {json.dumps({**body, 'choices': [], 'usage': usage})}\n\n")
        return [*out, "data: [DONE]\n\n"]
