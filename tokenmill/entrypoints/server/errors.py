"""One error type for every route, rendered in the format of the API the client speaks.

Handlers raise `APIError(status, message)`; the exception handler renders it as an OpenAI error
object, or, under `/v1/messages`, as an Anthropic one (with a `request-id` header). Messages are
built from validation details only (docs/reliability.md item 29) and capped in length (item 3).
"""

from __future__ import annotations

import json
import uuid

import pydantic
from fastapi.responses import JSONResponse

MAX_MESSAGE_CHARS = 1000
MAX_LISTED_ERRORS = 5

OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
    415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
}
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error", 413: "request_too_large",
    415: "invalid_request_error", 429: "rate_limit_error", 500: "api_error", 503: "api_error",
    529: "overloaded_error",
}


class APIError(Exception):
    """A failure to report to the client. `status` is the HTTP status; `type`/`code` override the
    defaults of the API's format."""

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = bounded(message)
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "...(truncated)"


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/v1/messages")


def openai_error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type or OPENAI_TYPES.get(err.status, "server_error"),
                      "param": err.param, "code": err.code}}


def anthropic_error_body(err: APIError) -> dict:
    return {"type": "error", "error": {"type": err.type or ANTHROPIC_TYPES.get(err.status, "api_error"),
                                       "message": err.message}}


def error_response(path: str, err: APIError) -> JSONResponse:
    headers = dict(err.headers)
    if is_anthropic_path(path):
        headers.setdefault("request-id", f"req_{uuid.uuid4().hex}")
        return JSONResponse(anthropic_error_body(err), status_code=err.status, headers=headers)
    return JSONResponse(openai_error_body(err), status_code=err.status, headers=headers)


def _loc(error: dict) -> str:
    return ".".join(str(x) for x in error.get("loc", ()) if x not in ("function-after", "function-before"))


def first_error_field(exc: pydantic.ValidationError) -> str | None:
    """The dotted path of the first invalid field (OpenAI's `param`), if the error has one."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    loc = _loc(errors[0]) if errors else ""
    return loc[:200] or None


def validation_message(exc: pydantic.ValidationError) -> str:
    """"field.path: what is wrong" for the first few errors, never the offending input itself."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = []
    for e in errors[:MAX_LISTED_ERRORS]:
        loc = _loc(e)
        # Our validators' messages read as sentences; pydantic prefixes them with "Value error, ".
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    if len(errors) > MAX_LISTED_ERRORS:
        parts.append(f"... and {len(errors) - MAX_LISTED_ERRORS} more errors")
    return bounded("; ".join(parts))


def stream_error_event(path: str, err: APIError) -> bytes:
    """How a stream that has started reports a failure, in the path's API format: an OpenAI `data:`
    chunk with `error`, or Anthropic's `event: error`."""
    if is_anthropic_path(path):
        head, body = b"event: error\n", anthropic_error_body(err)
    else:
        head, body = b"", openai_error_body(err)
    return head + b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
