"""The API process's handle on the engine-core process: start it, talk to it, notice its death.

`EngineCoreClient` owns the child process and the two ipc sockets (in a private 0700 temp dir, so
nothing listens on a network interface). It is asyncio-native (`zmq.asyncio`): `add_requests` and
`abort_requests` send (`encode_add_requests` + `send_add_requests` split the first, so a request
msgpack cannot carry fails before anything about it is registered), `get_output` awaits the next
`CoreStep`. A thread blocks on the process
sentinel; when the child exits unexpectedly, `on_death` is called on the event loop so the
`AsyncEngine` can fail every in-flight request at once instead of letting them hang.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import multiprocessing.connection
import os
import shutil
import tempfile
import threading
from typing import Callable

import msgspec
import zmq
import zmq.asyncio

from tokenmill.engine.core_process import (
    AbortRequests,
    AddRequests,
    CoreFailed,
    CoreMessage,
    CoreReady,
    CoreStep,
    EngineCoreLike,
    Shutdown,
    make_real_engine,
    run_engine_core,
)
from tokenmill.core.messages import EngineRequest
from tokenmill.engine.rl_control import ControlReply, ControlRequest

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine-core process is gone; no request can be served any more."""


class EngineCoreClient:
    """Starts and supervises the engine-core process. Create with `await EngineCoreClient.start()`."""

    def __init__(self) -> None:
        self._ipc_dir = tempfile.mkdtemp(prefix="tokenmill-ipc-")  # mkdtemp makes it 0700
        self.input_addr = f"ipc://{os.path.join(self._ipc_dir, 'input')}"
        self.output_addr = f"ipc://{os.path.join(self._ipc_dir, 'output')}"
        self._ctx = zmq.asyncio.Context()
        self._in_sock = self._ctx.socket(zmq.PUSH)
        self._in_sock.setsockopt(zmq.LINGER, 0)
        self._in_sock.bind(self.input_addr)
        self._out_sock = self._ctx.socket(zmq.PULL)
        self._out_sock.setsockopt(zmq.LINGER, 0)
        self._out_sock.bind(self.output_addr)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self.process: multiprocessing.process.BaseProcess | None = None
        self.kv_capacity_tokens = 0
        self.dead = False
        self.death_reason = ""
        self._closing = False
        self._core_failed = False  # it sent CoreFailed during start-up
        self._on_death: Callable[[str], None] | None = None
        self._control_calls: dict[int, asyncio.Future] = {}  # call id -> its ControlReply, when it comes

    @classmethod
    async def start(
        cls,
        engine_args_msgpack: bytes,
        make_engine: Callable[[bytes], EngineCoreLike] = make_real_engine,
        startup_timeout_s: float = 600.0,
        num_threads: int | None = None,
    ) -> "EngineCoreClient":
        """Spawns the core, waits for `CoreReady` (model loaded), raises `EngineDeadError` if it fails."""
        client = cls()
        # spawn, not fork: the API process has threads and maybe a tokenizer pool; fork would copy them.
        mp = multiprocessing.get_context("spawn")
        client.process = mp.Process(
            target=run_engine_core,
            args=(make_engine, engine_args_msgpack, client.input_addr, client.output_addr, os.getpid(),
                  num_threads),
            name="tokenmill-engine-core",
            daemon=True,
        )
        client.process.start()
        try:
            msg = await client._recv_until_ready(startup_timeout_s)
        except BaseException:
            client.close()
            raise
        client.kv_capacity_tokens = msg.kv_capacity_tokens
        logger.info("engine core ready (pid %d)", msg.pid)
        return client

    async def _recv_until_ready(self, timeout_s: float) -> CoreReady:
        assert self.process is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if await self._out_sock.poll(timeout=200):
                msg = self._decoder.decode(await self._out_sock.recv())
                if isinstance(msg, CoreReady):
                    return msg
                if isinstance(msg, CoreFailed):
                    self._core_failed = True  # it exits on its own: `close` sends it nothing
                    raise EngineDeadError(msg.message)
            if not self.process.is_alive():
                if await self._out_sock.poll(timeout=200):  # its last words (CoreFailed) may be in flight
                    continue
                raise EngineDeadError(f"engine core exited during start-up (code {self.process.exitcode})")
            if loop.time() > deadline:
                raise EngineDeadError(f"engine core not ready after {timeout_s:.0f}s")

    def watch(self, on_death: Callable[[str], None]) -> None:
        """Calls `on_death(reason)` on the current event loop if the core process exits unasked."""
        assert self.process is not None
        self._on_death = on_death
        loop = asyncio.get_running_loop()
        sentinel = self.process.sentinel

        def wait_for_exit() -> None:
            multiprocessing.connection.wait([sentinel])
            self.process.join(timeout=1)  # so exitcode is set
            if not self._closing:
                loop.call_soon_threadsafe(self._mark_dead, f"engine core exited (code {self.process.exitcode})")

        threading.Thread(target=wait_for_exit, daemon=True, name="core-watch").start()

    def _mark_dead(self, reason: str) -> None:
        if self.dead or self._closing:
            return
        self.dead = True
        self.death_reason = reason
        logger.error("%s", reason)
        for future in self._control_calls.values():
            if not future.done():
                future.set_exception(EngineDeadError(reason))
        self._control_calls.clear()
        if self._on_death is not None:
            self._on_death(reason)

    def encode_add_requests(self, requests: list[EngineRequest]) -> bytes:
        """The wire message; raises `OverflowError` / `msgspec.EncodeError` for a value msgpack
        cannot carry (an integer wider than 64 bits)."""
        return self._encoder.encode(AddRequests(requests=requests))

    async def send_add_requests(self, payload: bytes) -> None:
        if self.dead:
            raise EngineDeadError(self.death_reason)
        await self._in_sock.send(payload, copy=False)

    async def add_requests(self, requests: list[EngineRequest]) -> None:
        await self.send_add_requests(self.encode_add_requests(requests))

    async def abort_requests(self, request_ids: list[str]) -> None:
        if self.dead or not request_ids:
            return
        await self._in_sock.send(self._encoder.encode(AbortRequests(request_ids=request_ids)), copy=False)

    async def control(self, request: ControlRequest) -> ControlReply:
        """Send an RL call (engine/rl_control.py) and wait for its reply, which `get_output`
        (the AsyncEngine's output task) hands over."""
        if self.dead:
            raise EngineDeadError(self.death_reason)
        future = asyncio.get_running_loop().create_future()
        self._control_calls[request.call_id] = future
        try:
            await self._in_sock.send(self._encoder.encode(request), copy=False)
            return await future
        finally:
            self._control_calls.pop(request.call_id, None)

    async def get_output(self) -> CoreStep:
        """The next step's outputs and duration. Raises `EngineDeadError` if the core reports a crash."""
        while True:
            msg = self._decoder.decode(await self._out_sock.recv())
            if isinstance(msg, CoreStep):
                return msg
            if isinstance(msg, ControlReply):
                future = self._control_calls.get(msg.call_id)
                if future is not None and not future.done():
                    future.set_result(msg)
                continue
            if isinstance(msg, CoreFailed):
                self._mark_dead(msg.message)
                raise EngineDeadError(msg.message)

    def close(self, timeout_s: float = 5.0) -> None:
        """Asks the core to stop, reaps it (terminate, then kill), removes the socket dir."""
        self._closing = True
        proc = self.process
        if proc is not None and proc.is_alive():
            if not self._core_failed:  # one that reported failure exits by itself and reads nothing
                try:
                    self._in_sock.send(self._encoder.encode(Shutdown()), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            proc.join(timeout_s)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout_s)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self._in_sock.close(linger=0)
        self._out_sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._ipc_dir, ignore_errors=True)
