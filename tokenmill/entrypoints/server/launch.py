"""Running the app under uvicorn: SIGTERM drains, engine death exits non-zero, slow clients are
cut off.

Exit codes: 0 after a clean shutdown or drain, 1 if the engine core died or never started.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from typing import Awaitable, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.entrypoints.server.app import ServerConfig, ServerState, build_app

logger = logging.getLogger("tokenmill.server")

# After the drain, connections still open are cut after this long (their requests are aborted).
CUTOFF_AFTER_DRAIN_S = 1


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on request headers. uvicorn times out idle
    keep-alive connections but waits forever for headers that have begun to arrive, so a client
    sending one header byte at a time (slow-loris) holds a connection open indefinitely; here it
    gets a 408 and the connection is closed `header_timeout_s` after its first byte.

    The deadline is armed when the connection opens and whenever bytes of a new request arrive,
    and disarmed once h11 has the whole head (its view of the peer leaves IDLE)."""

    def __init__(self, *args, header_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None and data:
                self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()


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
    protocol = functools.partial(HeaderTimeoutProtocol, header_timeout_s=config.header_timeout_s)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                               lifespan="on", timeout_graceful_shutdown=CUTOFF_AFTER_DRAIN_S,
                               timeout_keep_alive=5, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
                               root_path=root_path, http=protocol)
    server = DrainingServer(uv_config, state)
    try:
        asyncio.run(server.serve())
    except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it caught once it has shut down
        pass
    if state.engine_died or not server.started:
        return 1
    return 0
