"""Running the app under uvicorn: SIGTERM drains, engine death exits non-zero.

Exit codes: 0 after a clean shutdown or drain, 1 if the engine core died or never started.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable

import uvicorn

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.entrypoints.server.app import ServerConfig, ServerState, build_app

logger = logging.getLogger("tokenmill.server")

# After the drain, connections still open are cut after this long (their requests are aborted).
CUTOFF_AFTER_DRAIN_S = 1


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM drains: new requests get 503, in-flight ones run to
    completion for up to `drain_timeout_s`, then the server stops."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        self.state.on_fatal = self._stop
        await super().serve(sockets)

    def _stop(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.state.draining and self._loop is not None:
            self.state.draining = True
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain()))
            return
        super().handle_exit(sig, frame)

    async def _drain(self) -> None:
        timeout = self.state.config.drain_timeout_s
        logger.info("SIGTERM: draining %d in-flight requests (up to %.0fs)", self.state.inflight, timeout)
        try:
            await asyncio.wait_for(self.state.idle.wait(), timeout)
            logger.info("drained; shutting down")
        except asyncio.TimeoutError:
            logger.warning("drain timeout: %d requests still in flight are cut off", self.state.inflight)
        self.should_exit = True


def serve(make_engine: Callable[[], Awaitable[AsyncEngine]], config: ServerConfig, *, host: str,
          port: int, log_level: str = "info", ssl_keyfile: str | None = None,
          ssl_certfile: str | None = None, root_path: str = "") -> int:
    """Runs the server until it stops; returns the process exit code. `ssl_*`: serve HTTPS;
    `root_path`: the URL prefix a proxy serves the app under."""
    app = build_app(config, make_engine)
    state: ServerState = app.state.server
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                               lifespan="on", timeout_graceful_shutdown=CUTOFF_AFTER_DRAIN_S,
                               timeout_keep_alive=5, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
                               root_path=root_path)
    server = DrainingServer(uv_config, state)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it caught once it has shut down
        pass
    if state.engine_died or not server.started:
        return 1
    return 0
