"""Reading a JSON request body safely: size cap before parsing, 415/400 instead of 422/500."""

from __future__ import annotations

import json
from typing import TypeVar

import pydantic
from fastapi import Request

from tokenmill.entrypoints.server.errors import APIError, validation_message

M = TypeVar("M", bound=pydantic.BaseModel)


async def read_model(request: Request, model_cls: type[M]) -> M:
    """Parses the body into `model_cls`, raising `APIError` 413 / 415 / 400 for bad bodies."""
    max_bytes: int = request.app.state.server.max_body_bytes
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "Content-Type must be application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is larger than the {max_bytes} byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():  # counted as it arrives: chunked bodies have no length
        size += len(chunk)
        if size > max_bytes:
            raise APIError(413, f"request body is larger than the {max_bytes} byte limit")
        chunks.append(chunk)
    try:
        obj = json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno} column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise APIError(400, f"request body is not valid JSON{where}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        return model_cls.model_validate(obj)
    except pydantic.ValidationError as exc:
        raise APIError(400, validation_message(exc)) from None
    except ValueError as exc:  # raised by our own validators with a user-facing message
        raise APIError(400, str(exc)) from None
