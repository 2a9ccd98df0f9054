"""The HTTP API's request and error schemas (pydantic, strict: ``true`` is no integer), shared
by the Ray Serve ingress (serve/app.py) and the dashboard's server (serve/dashboard.py).

No ``from __future__ import annotations`` in serve/: it breaks FastAPI's handling of request
models under ``@serve.ingress`` (bodies become query parameters).
"""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


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
    """A request the API refuses: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "not_found_error" if self.status == 404 else "invalid_request_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict]) -> APIError:
    """The 400 for a body that does not fit its schema (pydantic's errors, first one named)."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('msg', 'cannot parse')}", code="json_invalid")
    loc = ".".join(str(x) for x in first.get("loc", []) if x != "body")
    return APIError(400, f"{loc or 'body'}: {first.get('msg', 'invalid value')}", loc or None, first.get("type"))
