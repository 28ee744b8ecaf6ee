"""Glue every API handler shares: admitting requests with the right errors, merging several
streams, noticing a client that hung up, and SSE framing."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import AsyncIterator, Awaitable, TypeVar

from fastapi import Request

from tokenmill.engine.async_engine import AsyncEngine, QueueFullError, RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.engine.input_processor import ContextLengthError
from tokenmill.engine.rl_control import EngineSleepingError
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25
RETRY_AFTER_S = "1"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def engine_of(request: Request) -> AsyncEngine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None and getattr(request.app.state, "embedder", None) is not None:
        # The generation routes (both APIs) on a server that runs an embedding model.
        raise APIError(400, "this server runs an embedding model, which only supports /v1/embeddings",
                       param="model")
    return engine


def check_model(engine: AsyncEngine, model: str | None) -> str:
    """The served name to echo back; 404 for a model this server does not serve."""
    if model is not None and model not in engine_model_names(engine):
        raise APIError(404, f"The model `{model[:200]}` does not exist.", code="model_not_found",
                       param="model")
    return engine.model_name


def engine_model_names(engine: AsyncEngine) -> set[str]:
    return {engine.model_name, *getattr(engine, "model_aliases", ())}


def request_timeout(request: Request, timeout: float | None) -> float | None:
    """The request's own `timeout`, else the server's `--request-timeout` (None: no deadline)."""
    return timeout if timeout is not None else request.app.state.server.config.request_timeout_s


async def submit_all(engine: AsyncEngine, base_id: str, prompts: list[str | list[int]],
                     params: SamplingParams, *, anthropic: bool = False, priority: int = 0,
                     cache_salt: str | None = None, chat: bool = False, arrival: float | None = None,
                     timeout_s: float | None = None) -> list[RequestStream]:
    """Admits one request per prompt, all or nothing, mapping failures to `APIError`s.
    `timeout_s` counts from `arrival` (default: now)."""
    streams: list[RequestStream] = []
    arrival = time.monotonic() if arrival is None else arrival
    try:
        for i, prompt in enumerate(prompts):
            request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(await engine.submit(request_id, prompt, params, arrival_time=arrival,
                                               priority=priority, cache_salt=cache_salt,
                                               # a chat template writes its own BOS
                                               add_special_tokens=not chat, timeout_s=timeout_s))
    except BaseException as exc:
        for stream in streams:
            engine.abort(stream.request_id)
        raise _to_api_error(exc, anthropic) from None
    return streams


def _to_api_error(exc: BaseException, anthropic: bool) -> BaseException:
    if isinstance(exc, QueueFullError):
        headers = {"retry-after": str(exc.retry_after_s)}
        return APIError(529 if anthropic else 429, str(exc), headers=headers)
    if isinstance(exc, EngineDeadError):
        return APIError(503, "the engine is not running")
    if isinstance(exc, EngineSleepingError):  # paused or asleep, --requests-while-paused reject
        return APIError(503, str(exc), headers={"retry-after": RETRY_AFTER_S})
    if isinstance(exc, RequestTimeoutError):
        return APIError(408, str(exc), code="request_timeout")
    if isinstance(exc, ContextLengthError):
        return APIError(400, str(exc), code="context_length_exceeded")
    if isinstance(exc, ValueError):  # user-input errors from InputProcessor / SamplingParams
        return APIError(400, str(exc))
    return exc


def to_api_error(exc: BaseException, anthropic: bool = False) -> APIError:
    """For errors from building `SamplingParams` and the like, outside `submit_all`."""
    err = _to_api_error(exc, anthropic)
    if isinstance(err, APIError):
        return err
    raise exc


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Yields `(prompt_index, output)` from several streams as they arrive. Closing the merged
    iterator cancels the pumps, whose streams then abort their requests."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, exc))
            return
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client hangs up first (its request is then aborted)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise APIError(499, "client disconnected")
    return task.result()


def sse(data: dict | str, event: str | None = None) -> bytes:
    """One server-sent event. JSON is compact and on one line, as SSE `data:` requires."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
