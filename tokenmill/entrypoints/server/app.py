"""The FastAPI app: routes of both APIs, the guard in front of them, error rendering, lifespan.

`build_app(config, make_engine)` takes the engine as an async factory so tests can hand in an
`AsyncEngine` over a fake core; `launch.py` passes the real one.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.entrypoints.anthropic.routes import router as anthropic_router
from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder
from tokenmill.entrypoints.openai.routes import router as openai_router
from tokenmill.entrypoints.server.errors import APIError, error_response
from tokenmill.entrypoints.server.metrics import ServerMetrics, log_periodically
from tokenmill.entrypoints.server.rl_routes import sleep_router, weights_router
from tokenmill.version import __version__

logger = logging.getLogger("tokenmill.server")

UNGUARDED_PATHS = frozenset({"/health"})


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout_s: float = 30.0
    log_stats_interval_s: float = 10.0
    tool_call_parser: str | None = None  # for tool_choice "auto" (see tool_parsers.TOOL_PARSERS)
    # RL routes (rl_routes.py), off unless asked for; and what a request meets while the engine
    # is paused or asleep: "wait" until it resumes, or "reject" (503).
    sleep_routes: bool = False
    weight_update_routes: bool = False
    requests_while_paused: str = "wait"


class ServerState:
    """What changes while the server runs: draining, the HTTP requests in flight, engine death."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.draining = False
        self.engine_died = False
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.on_fatal: Callable[[], None] | None = None  # set by the launcher: stop uvicorn

    @property
    def max_body_bytes(self) -> int:
        return self.config.max_body_bytes


class GuardMiddleware:
    """Pure ASGI (streams pass through untouched): 503 while draining, API-key check, and the count
    of requests in flight that a drain waits for. `/health` is never guarded."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self._key = key.encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if self.state.draining or self.state.engine_died:
            await error_response(path, APIError(503, "the server is shutting down"))(scope, receive, send)
            return
        if self._key is not None and not self._authorized(scope):
            await error_response(path, APIError(401, "invalid or missing API key"))(scope, receive, send)
            return
        self.state.inflight += 1
        self.state.idle.clear()
        try:
            await self.app(scope, receive, send)
        finally:
            self.state.inflight -= 1
            if self.state.inflight == 0:
                self.state.idle.set()

    def _authorized(self, scope) -> bool:
        supplied = b""
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                supplied = value[7:].strip()
            elif name == b"x-api-key" and not supplied:
                supplied = value.strip()
        # Constant time: the comparison does not reveal how many leading bytes matched.
        return hmac.compare_digest(supplied, self._key)


def build_app(config: ServerConfig,
              make_engine: Callable[[], Awaitable[AsyncEngine | AsyncEmbedder]]) -> FastAPI:
    """`make_engine` returns an `AsyncEngine` (generation) or an `AsyncEmbedder` (embeddings)."""
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = await make_engine()
        metrics = ServerMetrics(engine.model_name)
        if isinstance(engine, AsyncEmbedder):
            # An embedding model runs in this process; the generation routes answer 400.
            app.state.engine = None
            app.state.embedder = engine
        else:
            engine.stats_listener = metrics
            engine.add_death_callback(lambda reason: _on_engine_death(state))
            engine.gate.reject_while_closed = config.requests_while_paused == "reject"
            app.state.engine = engine
            app.state.embedder = None
        app.state.metrics = metrics
        log_task = asyncio.create_task(log_periodically(metrics, config.log_stats_interval_s))
        try:
            yield
        finally:
            log_task.cancel()
            await engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    if config.sleep_routes:
        app.include_router(sleep_router)
    if config.weight_update_routes:
        app.include_router(weights_router)
    _add_basic_routes(app)
    _add_error_handlers(app)
    app.add_middleware(GuardMiddleware, state=state)
    return app


def is_serving(app: FastAPI) -> bool:
    """What `/health` answers (and a Ray Serve replica's health check): false while draining,
    before the engine is up, and once it died or wedged."""
    state: ServerState = app.state.server
    engine: AsyncEngine | AsyncEmbedder | None = (getattr(app.state, "engine", None)
                                                  or getattr(app.state, "embedder", None))
    return not (state.draining or state.engine_died or engine is None or not engine.is_healthy())


def _on_engine_death(state: ServerState) -> None:
    # In-flight requests already got their error; /health answers 503 for a moment, then the
    # server exits non-zero so a supervisor restarts it (RELIABILITY.md item 20). A Ray Serve
    # replica has no `on_fatal`: its failing health check makes Ray replace it.
    state.engine_died = True
    if state.on_fatal is not None:
        asyncio.get_running_loop().call_later(1.0, state.on_fatal)


def _add_basic_routes(app: FastAPI) -> None:
    @app.get("/health")
    async def health(request: Request) -> Response:
        return Response(status_code=200 if is_serving(request.app) else 503)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, "request failed")
        return error_response(request.url.path, APIError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.url.path, APIError(400, "invalid request"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        # Never str(exc): internals (paths, reprs) stay in the log (RELIABILITY.md item 29).
        logger.exception("unhandled error on %s", request.url.path)
        return error_response(request.url.path, APIError(500, "internal server error"))
