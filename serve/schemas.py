"""The HTTP API's request and error schemas (pydantic, strict: ``true`` is no integer), shared
by the Ray Serve ingress (serve/app.py) and the dashboard's server (serve/dashboard.py).

No ``from __future__ import annotations`` in serve/: it breaks FastAPI's handling of request
models under ``@serve.ingress`` (bodies become query parameters).
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


def _utf8(text: str) -> str:
    """JSON strings may hold lone surrogates ("\\udcff"), which no UTF-8 byte sequence encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"holds a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}: not valid UTF-8"
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_utf8)]
# A seed is one of torch's generator seeds; retries use seed + attempt, so keep room above it.
Seed = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1, description="a 64-bit signed integer")]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    prompt: Text
    max_tokens: StrictInt = Field(16, description="new bytes to generate")
    temperature: Number = Field(1.0, description="0 (greedy) to 2")
    top_p: Number = Field(1.0, description="in (0, 1]")
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    stop: Text | list[Text] | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: StrictStr
    messages: list[ChatMessage]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: Seed | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    stop: Text | list[Text] | None = None


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: Text | None = Field(None, description="prompt text (or give bits)")
    bits: list[StrictInt] | None = Field(None, description="parity-encoded prompt bits, 9 per byte")
    max_new_bytes: StrictInt = 32
    temperature: Number = 1.0
    top_p: Number = 1.0
    seed: Seed | None = None


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
    """The 400 for a body that does not fit its schema. Of pydantic's errors the most specific
    is named (a failed check over "not a string" from another member of a union), at its field
    (union members' tags dropped from the location)."""
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('msg', 'cannot parse')}", code="json_invalid")
    parts = [str(x) for x in first.get("loc", []) if x != "body" and not (isinstance(x, str) and "[" in x)]
    loc = ".".join(parts)
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(400, f"{loc or 'body'}: {message}", loc or None, first.get("type"))
