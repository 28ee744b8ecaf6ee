"""Reading a JSON request body safely: 415 / 413 / 408 / 400 instead of 422 or 500, and no request
whose parsing alone would stall the event loop.

The body is read with a deadline (a client trickling bytes is cut off with 408), capped in bytes
before parsing (413), and capped in parsing work (400): pydantic parses on the event loop and holds
the GIL while it does, so a body of millions of small JSON values would freeze every other request,
`/health` included, for seconds. `json_cost` bounds that work from the raw bytes at C speed first.
Parsing and validation are one strict pass (`model_validate_json`): depth is limited by the parser,
and invalid UTF-8 or lone surrogates (`"\\ud800"`) are a 400 here, not a failure in the tokenizer.
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

import pydantic
from fastapi import Request
from starlette.requests import ClientDisconnect

from tokenmill.entrypoints.server.errors import APIError, first_error_field, validation_message

M = TypeVar("M", bound=pydantic.BaseModel)

# Parsing work allowed per body, in units of one JSON value (a container counts CONTAINER_COST).
# Measured with pydantic on the 2-core CI box: ~6 M scalars/s, ~0.7 M nested arrays/s; the budget
# keeps one body's parse, and its pre-scan, near 60 ms each (docs/reliability.md).
MAX_JSON_COST = 300_000
CONTAINER_COST = 10


def _structure(data: bytes) -> int:
    return data.count(b",") + CONTAINER_COST * (data.count(b"[") + data.count(b"{"))


def json_cost(body: bytes) -> int:
    """The work of parsing `body` in units of one JSON value, good enough to compare with
    `MAX_JSON_COST`: exact up to it, and past it some count that is past it too. Runs at C speed;
    the string-aware pass runs only when the quick count over the raw bytes (which also counts
    brackets and commas inside strings) is over the budget."""
    quick = _structure(body)
    if quick <= MAX_JSON_COST:
        return quick
    num_quotes = body.count(b'"')
    if num_quotes // 2 > MAX_JSON_COST:  # that many strings alone are over the budget
        return num_quotes // 2
    return string_aware_cost(body)


def string_aware_cost(body: bytes) -> int:
    """Separators and (weighted) containers outside string literals, plus one per string."""
    # Escaped backslashes go first, then escaped quotes: what is left of `"` delimits strings, so
    # every other piece of the split is outside them.
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    pieces = body.split(b'"')
    outside = pieces[::2]
    if len(outside) > 64:  # many pieces: one join is cheaper than a count per piece
        outside = [b"".join(outside)]
    return sum(_structure(piece) for piece in outside) + len(pieces) // 2


async def read_body(request: Request) -> bytes:
    """The raw body, read within `body_timeout_s` and capped at `max_body_bytes`."""
    state = request.app.state.server
    max_bytes: int = state.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(413, f"request body is larger than the {max_bytes} byte limit")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(state.config.body_timeout_s):
            async for chunk in request.stream():  # counted as it arrives: chunked bodies have no length
                size += len(chunk)
                if size > max_bytes:
                    raise APIError(413, f"request body is larger than the {max_bytes} byte limit")
                chunks.append(chunk)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {state.config.body_timeout_s:g} s",
                       headers={"connection": "close"}) from None
    except ClientDisconnect:
        raise APIError(499, "client disconnected") from None
    if state.draining:  # a body that finished arriving during a drain is not admitted
        raise APIError(503, "the server is shutting down")
    return b"".join(chunks)


async def read_model(request: Request, model_cls: type[M]) -> M:
    """Parses the body into `model_cls`, raising `APIError` 408 / 413 / 415 / 400 for bad bodies
    (with `param` naming the first bad field)."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "Content-Type must be application/json")
    body = await read_body(request)
    cost = json_cost(body)
    if cost > MAX_JSON_COST:
        raise APIError(400, f"request body has too many JSON values or is nested too deeply (about {cost} "
                            f"units of parsing work; at most {MAX_JSON_COST})")
    await asyncio.sleep(0)  # let other requests run between the scan and the parse
    try:
        return model_cls.model_validate_json(body)
    except pydantic.ValidationError as exc:
        raise APIError(400, _body_error(exc), param=first_error_field(exc)) from None
    except ValueError as exc:  # raised by our own validators with a user-facing message
        raise APIError(400, str(exc)) from None


def _body_error(exc: pydantic.ValidationError) -> str:
    first = exc.errors(include_url=False, include_input=False)[0]
    if first["type"] == "json_invalid":
        # The parser's own words: where and what (depth, surrogates, bad UTF-8), never the input.
        return f"request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}"
    if first["type"] == "model_type" and not first["loc"]:
        return "request body must be a JSON object"
    return validation_message(exc)
