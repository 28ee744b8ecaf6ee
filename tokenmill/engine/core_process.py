"""The `EngineCore` busy loop in its own process, talking to the API process over ZMQ.

Two ipc sockets in a private temp dir: the client PUSHes `CoreRequest`s to `input_addr`, the core
PUSHes `CoreMessage`s to `output_addr`. Everything on the wire is msgspec msgpack of the typed
structs below (docs/reliability.md item 27: never pickle). Socket I/O and (de)serialization run on
two threads so the busy loop only schedules and computes:

    input thread:  recv -> decode -> queue.Queue  ->  busy loop: add/abort, step()
    busy loop:     EngineOutputs -> queue.Queue   ->  output thread: encode -> send

Every request the core is sent gets an answer: one it cannot decode or add finishes at once with
`FinishReason.ERROR`, so its client fails fast instead of holding admission capacity forever.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Callable, Protocol, Union

import msgspec
import zmq

from tokenmill.core.messages import EngineOutput, EngineOutputs, EngineRequest, FinishReason, SchedulerStats
from tokenmill.engine.rl_control import ControlReply, ControlRequest, run_control
from tokenmill.utils.process import watch_parent

logger = logging.getLogger(__name__)

# How often an idle core reports its stats, and how often it checks that its parent still lives.
IDLE_HEARTBEAT_S = 1.0


# ----- client -> core -----
class AddRequests(msgspec.Struct, tag="add", gc=False):
    requests: list[EngineRequest]


class AbortRequests(msgspec.Struct, tag="abort", gc=False):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


# ControlRequest: an RL call (sleep, weight update, ...; engine/rl_control.py), run between steps.
CoreRequest = Union[AddRequests, AbortRequests, Shutdown, ControlRequest]


# ----- core -> client -----
class CoreReady(msgspec.Struct, tag="ready"):
    """Sent once the model is loaded and the KV pool sized."""

    kv_capacity_tokens: int
    pid: int


class CoreStep(msgspec.Struct, tag="step", gc=False):
    """One `step()`'s outputs and how long it took (seconds; 0 for an idle heartbeat, which
    carries no outputs, only stats, or for requests refused without a step)."""

    outputs: EngineOutputs
    step_s: float = 0.0


class CoreFailed(msgspec.Struct, tag="failed"):
    """The core hit an exception it cannot recover from; it exits right after sending this."""

    message: str


CoreMessage = Union[CoreReady, CoreStep, CoreFailed, ControlReply]


# ----- inside the core: the input thread's note that requests could not be decoded -----
class _RequestId(msgspec.Struct):
    request_id: str  # every other field is skipped, so a bad one cannot stop this decode


class _AddedIds(msgspec.Struct, tag="add"):
    requests: list[_RequestId]


class RefuseRequests(msgspec.Struct):
    """Requests the busy loop must answer with an error instead of adding."""

    request_ids: list[str]


class EngineCoreLike(Protocol):
    """What the busy loop needs from an engine (the real `EngineCore`, or a test fake)."""

    kv_capacity_tokens: int

    def add_request(self, request: EngineRequest) -> None: ...
    def abort_requests(self, request_ids: list[str]) -> None: ...
    def step(self) -> EngineOutputs: ...
    def has_unfinished_requests(self) -> bool: ...
    def get_stats(self) -> SchedulerStats: ...
    def shutdown(self) -> None: ...


def make_real_engine(engine_args_msgpack: bytes) -> EngineCoreLike:
    """Builds the real `EngineCore` from msgpack-encoded `EngineArgs` (the default factory)."""
    from tokenmill.config import EngineArgs
    from tokenmill.engine.engine_core import EngineCore

    engine_args = msgspec.msgpack.decode(engine_args_msgpack, type=EngineArgs)
    # In its own process a dead tensor-parallel rank is engine death: the process ends at once.
    return EngineCore(engine_args.create_engine_config(), exit_process_on_worker_death=True)


def cpu_threads_for_core(requested: int | None) -> int | None:
    """Intra-op threads for the core's CPU math: `requested` (the serving entry point chooses it,
    `entrypoints/threads.py`: the cores free of other work, one left for the API process), or None:
    leave torch as it is (OMP_NUM_THREADS set it)."""
    return None if requested is None else max(1, requested)


def run_engine_core(
    make_engine: Callable[[bytes], EngineCoreLike],
    engine_args_msgpack: bytes,
    input_addr: str,
    output_addr: str,
    parent_pid: int,
    num_threads: int | None = None,
) -> None:
    """Entry point of the engine-core process (a `multiprocessing` spawn target).

    `make_engine` is a module-level function (spawn sends it by reference); its argument is opaque
    bytes, so nothing but a function name and bytes crosses the process boundary at start-up.
    `num_threads`: see `cpu_threads_for_core`.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [core] %(message)s")
    threads = cpu_threads_for_core(num_threads)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        logger.info("engine core uses %d CPU threads", threads)
    ctx = zmq.Context()
    # The output socket connects first so a startup failure can still be reported.
    out_sock = ctx.socket(zmq.PUSH)
    out_sock.setsockopt(zmq.LINGER, 2000)
    out_sock.connect(output_addr)
    encoder = msgspec.msgpack.Encoder()
    try:
        engine = make_engine(engine_args_msgpack)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, then we exit non-zero
        logger.exception("engine core failed to start")
        # The cause itself: start-up errors are mostly the user's to fix (memory, max_model_len).
        out_sock.send(encoder.encode(CoreFailed(message=f"engine failed to start: {type(exc).__name__}: {exc}")))
        out_sock.close()
        ctx.term()  # waits (up to LINGER) until the message is out: os._exit would drop it
        os._exit(1)
    in_sock = ctx.socket(zmq.PULL)
    in_sock.connect(input_addr)

    inbox: queue.Queue[CoreRequest] = queue.Queue()
    outbox: queue.Queue[CoreMessage | None] = queue.Queue()
    threading.Thread(target=_input_thread, args=(in_sock, inbox), daemon=True, name="core-in").start()
    out_thread = threading.Thread(target=_output_thread, args=(out_sock, outbox), daemon=True,
                                  name="core-out")
    out_thread.start()
    threading.Thread(target=watch_parent, args=(parent_pid,), daemon=True, name="core-parent").start()

    outbox.put(CoreReady(kv_capacity_tokens=int(engine.kv_capacity_tokens), pid=os.getpid()))
    code = 0
    try:
        _busy_loop(engine, inbox, outbox)
    except Exception as exc:  # noqa: BLE001 - any engine bug ends the process; the client fails requests
        logger.exception("engine core crashed")
        outbox.put(CoreFailed(message=f"engine core crashed: {type(exc).__name__}"))
        code = 1
    outbox.put(None)
    out_thread.join(timeout=5)
    try:
        engine.shutdown()
    finally:
        os._exit(code)


def _busy_loop(engine: EngineCoreLike, inbox: queue.Queue, outbox: queue.Queue) -> None:
    last_sent = 0.0
    while True:
        # Block only when there is nothing to compute; otherwise take what arrived and step.
        busy = engine.has_unfinished_requests()
        while True:
            try:
                msg = inbox.get(block=not busy, timeout=None if busy else IDLE_HEARTBEAT_S)
            except queue.Empty:
                break
            if isinstance(msg, Shutdown):
                return
            if isinstance(msg, AddRequests):
                refused = []
                for request in msg.requests:
                    try:
                        engine.add_request(request)
                    except Exception:  # noqa: BLE001 - this request's failure, not the engine's
                        logger.exception("could not add request %s", request.request_id)
                        refused.append(request.request_id)
                _refuse(refused, outbox)
            elif isinstance(msg, RefuseRequests):
                _refuse(msg.request_ids, outbox)
            elif isinstance(msg, ControlRequest):
                outputs, reply = run_control(engine, msg)
                if outputs:
                    outbox.put(CoreStep(outputs=EngineOutputs(outputs=outputs, scheduler_stats=engine.get_stats(),
                                                              timestamp=time.time())))
                outbox.put(reply)
            else:
                engine.abort_requests(msg.request_ids)
            busy = True  # drain the rest without blocking
            if inbox.empty():
                break
        now = time.time()
        if engine.has_unfinished_requests():
            start = time.perf_counter()
            outputs = engine.step()
            step_s = time.perf_counter() - start
            outputs.timestamp = outputs.timestamp or now
            if outputs.scheduler_stats is None:
                outputs.scheduler_stats = engine.get_stats()
            outbox.put(CoreStep(outputs=outputs, step_s=step_s))
            last_sent = now
        elif now - last_sent >= IDLE_HEARTBEAT_S:
            # Idle heartbeat: the client sees fresh stats (running 0, KV usage) and knows we live.
            outbox.put(CoreStep(outputs=EngineOutputs(outputs=[], scheduler_stats=engine.get_stats(),
                                                      timestamp=now)))
            last_sent = now


def _refuse(request_ids: list[str], outbox: queue.Queue) -> None:
    if request_ids:
        outbox.put(CoreStep(outputs=EngineOutputs(
            outputs=[EngineOutput(request_id=rid, new_token_ids=[], finish_reason=FinishReason.ERROR)
                     for rid in request_ids], timestamp=time.time())))


def _input_thread(sock: zmq.Socket, inbox: queue.Queue) -> None:
    decoder = msgspec.msgpack.Decoder(CoreRequest)
    ids_decoder = msgspec.msgpack.Decoder(_AddedIds)
    while True:
        try:
            frame = sock.recv(copy=False)
        except zmq.ContextTerminated:
            return
        try:
            inbox.put(decoder.decode(frame.buffer))
        except msgspec.DecodeError as exc:
            # A field the front end should have refused: answer each request in the message with
            # an error, so none waits forever. Only a frame without request ids is dropped.
            try:
                ids = [r.request_id for r in ids_decoder.decode(frame.buffer).requests]
            except msgspec.DecodeError:
                logger.error("dropped an undecodable message from the client: %s", exc)
                continue
            logger.error("refused %d requests the core cannot decode: %s", len(ids), exc)
            inbox.put(RefuseRequests(request_ids=ids))


def _output_thread(sock: zmq.Socket, outbox: queue.Queue) -> None:
    encoder = msgspec.msgpack.Encoder()
    while True:
        msg = outbox.get()
        if msg is None:
            return
        sock.send(encoder.encode(msg), copy=False)
