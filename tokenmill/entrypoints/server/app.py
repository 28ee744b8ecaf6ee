"""The FastAPI app: routes of both APIs, the guard in front of them, error rendering, lifespan,
and the OpenAPI schema (`/openapi.json`, `/docs`) built from the request models.

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
from starlette.routing import Match

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.entrypoints.anthropic.routes import router as anthropic_router
from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder
from tokenmill.entrypoints.openai.responses.routes import router as responses_router
from tokenmill.entrypoints.openai.responses.store import ResponseStore
from tokenmill.entrypoints.openai.routes import router as openai_router
from tokenmill.entrypoints.server.errors import APIError, error_response
from tokenmill.entrypoints.server.metrics import ServerMetrics, log_periodically
from tokenmill.entrypoints.server.rl_routes import sleep_router, weights_router
from tokenmill.entrypoints.server.playground import PLAYGROUND_PATHS, add_playground_routes
from tokenmill.entrypoints.server.request_log import RequestLogger
from tokenmill.entrypoints.server.openapi import install_openapi
from tokenmill.entrypoints.server.output_parsing import ServerParsers
from tokenmill.version import __version__

logger = logging.getLogger("tokenmill.server")

# The playground's page holds no data (it asks for the key and sends it with every API call).
UNGUARDED_PATHS = frozenset({"/health", *PLAYGROUND_PATHS})


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None
    max_body_bytes: int = 8 * 1024 * 1024
    drain_timeout_s: float = 30.0
    log_stats_interval_s: float = 10.0
    tool_call_parser: str | None = None  # for tool_choice "auto" (see tool_parsers.TOOL_PARSERS)
    reasoning_parser: str | None = None  # splits thinking from the answer (reasoning.REASONING_PARSERS)
    response_role: str = "assistant"  # the role of chat replies to a new turn
    metrics_prefix: str = "tokenmill"  # or "vllm", for vLLM's dashboards and alerts
    log_stats: bool = True  # the periodic throughput line (--disable-log-stats turns it off)
    log_requests: bool = False  # one line per request (--enable-log-requests)
    max_log_len: int | None = None  # prompt characters / token ids in that line
    # CORS (--allowed-origins ...): none by default, so no other web page can read the API's
    # answers through a visitor's browser.
    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # Slow clients: headers must arrive within header_timeout_s of the first byte (launch.py), a
    # body within body_timeout_s of its headers (request_body.py); 408 otherwise.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    # A deadline for requests that give no `timeout` of their own; None: none.
    request_timeout_s: float | None = None
    # RL routes (rl_routes.py), off unless asked for; and what a request meets while the engine
    # is paused or asleep: "wait" until it resumes, or "reject" (503).
    sleep_routes: bool = False
    weight_update_routes: bool = False
    requests_while_paused: str = "wait"

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.requests_while_paused not in ("wait", "reject"):
            raise ValueError(f"requests_while_paused must be wait or reject, got {self.requests_while_paused!r}")


class ServerState:
    """What changes while the server runs: draining, the HTTP requests in flight, engine death."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.draining = False
        self.engine_died = False
        self.inflight = 0  # requests whose body has arrived (or that have none): a drain waits for them
        self.idle = asyncio.Event()
        self.idle.set()
        self.on_fatal: Callable[[], None] | None = None  # set by the launcher: stop uvicorn

    def enter(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


def route_path(scope) -> str:
    """The path the routes see: with --root-path, uvicorn puts the prefix in front of the path
    (ASGI), and the router takes it off again; the guard must judge the same path."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


class GuardMiddleware:
    """Pure ASGI (streams pass through untouched): 503 while draining, API-key check, the count of
    requests in flight that a drain waits for, and the last resort for an unexpected exception.
    `/health` is never guarded.

    A request counts as in flight once its body has fully arrived: a client trickling a body in
    does not hold up a drain (it is cut off with the connection when the server stops).
    """

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state
        key = state.config.api_key
        self._key = key.encode() if key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in UNGUARDED_PATHS:
            await self._run(scope, receive, send)
            return
        if self.state.draining or self.state.engine_died:
            await error_response(path, APIError(503, "the server is shutting down"))(scope, receive, send)
            return
        if self._key is not None and not self._authorized(scope):
            await error_response(path, APIError(401, "invalid or missing API key"))(scope, receive, send)
            return
        counted = False

        def count() -> None:
            nonlocal counted
            if not counted:
                counted = True
                self.state.enter()

        async def receive_counted():
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                count()  # the whole body is here (or the client left)
            return message

        async def send_counted(message) -> None:
            count()  # a response started before the body was read (GET, an early error)
            await send(message)

        try:
            await self._run(scope, receive_counted, send_counted)
        finally:
            if counted:
                self.state.leave()

    async def _run(self, scope, receive, send) -> None:
        """The app, with any exception that escaped its handlers answered here as a 500. Letting
        it reach uvicorn would close the connection under the 500 already sent, and a client
        reusing that keep-alive connection would see a reset."""
        started = False

        async def send_tracked(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:  # noqa: BLE001 - logged; never str(exc) to the client (item 29)
            logger.exception("unhandled error on %s", scope["path"])
            if started:
                raise  # a response half-sent cannot be fixed: uvicorn closes the connection
            await error_response(scope["path"], APIError(500, "internal server error"))(scope, receive, send)

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
        metrics = ServerMetrics(engine.model_name, prefix=config.metrics_prefix,
                                max_model_len=getattr(engine, "max_model_len", 8192))
        if isinstance(engine, AsyncEmbedder):
            # An embedding model runs in this process; the generation routes answer 400.
            app.state.engine = None
            app.state.embedder = engine
        else:
            engine.stats_listener = metrics
            engine.add_death_callback(lambda reason: _on_engine_death(state))
            engine.gate.reject_while_closed = config.requests_while_paused == "reject"
            if config.log_requests:
                engine.request_logger = RequestLogger(config.max_log_len)
            _describe_cache(metrics, engine)
            app.state.engine = engine
            app.state.embedder = None
            app.state.parsers = ServerParsers(engine.tokenizer, config.tool_call_parser, config.reasoning_parser)
        app.state.metrics = metrics
        log_task = (asyncio.create_task(log_periodically(metrics, config.log_stats_interval_s))
                    if config.log_stats else None)
        try:
            yield
        finally:
            if log_task is not None:
                log_task.cancel()
            await engine.shutdown()

    app = FastAPI(title="tokenmill", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None, openapi_url="/openapi.json")
    app.state.server = state
    app.include_router(openai_router)
    app.include_router(anthropic_router)
    app.include_router(responses_router)
    app.state.responses = ResponseStore()
    if config.sleep_routes:
        app.include_router(sleep_router)
    if config.weight_update_routes:
        app.include_router(weights_router)
    _add_basic_routes(app)
    add_playground_routes(app)
    _add_error_handlers(app)
    install_openapi(app, api_key_required=config.api_key is not None)
    app.add_middleware(GuardMiddleware, state=state)
    if config.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        # Outermost, so a browser's preflight (OPTIONS, no API key) is answered before the guard.
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=list(config.allowed_methods),
                           allow_headers=list(config.allowed_headers),
                           allow_credentials=config.allow_credentials)
    return app


def _describe_cache(metrics: ServerMetrics, engine: AsyncEngine) -> None:
    config = getattr(engine, "config", None)  # absent on test engines built from parts
    if config is None:
        return
    cache = config.cache
    block_size = cache.block_size
    metrics.set_cache_config(
        block_size=block_size, num_gpu_blocks=engine.client.kv_capacity_tokens // block_size,
        cache_dtype=str(cache.kv_cache_dtype or config.model.dtype).removeprefix("torch."),
        enable_prefix_caching=cache.enable_prefix_caching,
        gpu_memory_utilization=cache.gpu_memory_utilization, device=config.device.type)


def is_serving(app: FastAPI) -> bool:
    """What `/health` answers (and a Ray Serve replica's health check): false while draining,
    before the engine is up, and once it died or wedged."""
    state: ServerState = app.state.server
    engine: AsyncEngine | AsyncEmbedder | None = (getattr(app.state, "engine", None)
                                                  or getattr(app.state, "embedder", None))
    return not (state.draining or state.engine_died or engine is None or not engine.is_healthy())


def _on_engine_death(state: ServerState) -> None:
    # In-flight requests already got their error; /health answers 503 for a moment, then the
    # server exits non-zero so a supervisor restarts it (docs/reliability.md item 20). A Ray Serve
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


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(app: FastAPI, scope) -> list[str]:
    """The methods some route serves at this request's path."""
    return [method for method in _METHODS
            if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = {404: "no such route", 405: "method not allowed"}.get(exc.status_code, "request failed")
        headers = exc.headers
        if exc.status_code == 405:
            # RFC 9110: `Allow` lists every method of the path. Starlette's names only the first
            # route that matched the path, and a path may have several (GET and DELETE of a
            # stored response).
            headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(app, request.scope))}
        return error_response(request.url.path, APIError(exc.status_code, message, headers=headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(request.url.path, APIError(400, "invalid request"))
    # Anything else is answered by GuardMiddleware._run: as a 500, and never with str(exc).
