"""Tensor parallelism across processes: rank 0 (the driver) lives in the engine-core process and
samples; ranks 1..N-1 are worker processes (`worker_process.py`) that run the same steps on their
shard of the model.

    EngineCore --SchedulerOutput--> MultiprocExecutor --WorkerStep (ZMQ, msgspec)--> worker processes
                                    | rank 0 Worker      |                            | rank r Worker
                                    +---- NCCL (GPU) / gloo (CPU): all-reduce, all-gather ----+

The scheduler runs once. Each step the driver sends the SchedulerOutput (plus the tokens it has
read back since the last message) to every worker, then runs its own rank; the collectives inside
the model keep the ranks in lock step. A control call between steps (sleep, a weight update,
collective_rpc) goes the same way, and each worker answers it with a WorkerReply. Workers never sample: they learn the tokens from a later
message, and under async scheduling, where step N+1 is sent before step N's tokens are read, from
a broadcast of rank 0's sampled-token tensor on the devices.

Failure: a watchdog thread polls the workers. When one exits unasked, the rest are killed, the
next `execute` raises `WorkerDiedError`, and a step blocked in a collective (NCCL waits forever
for a dead peer) ends the process after a grace period, which the server reports as engine death.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import msgspec
import torch
import zmq

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.distributed.parallel_state import init_tensor_parallel
from tokenmill.executor.abstract import Executor
from tokenmill.executor.messages import (
    WorkerFailed,
    WorkerInit,
    WorkerMessage,
    WorkerReady,
    WorkerReply,
    WorkerShutdown,
    WorkerStep,
)
from tokenmill.worker.control import WorkerCall
from tokenmill.worker.worker import Worker, make_worker

logger = logging.getLogger(__name__)

WORKER_START_TIMEOUT_S = 300.0
WATCHDOG_POLL_S = 0.2
# How long a step may stay blocked after a rank died before the process is ended.
STUCK_STEP_GRACE_S = 10.0


class WorkerDiedError(RuntimeError):
    pass


class MultiprocExecutor(Executor):
    """Rank 0's worker plus the worker processes of ranks 1..N-1.

    `exit_process_on_worker_death`: the server's engine-core process sets it, so a dead rank ends
    that process at once, which the API process reports as engine death (503, error chunks,
    non-zero exit); offline, the next call raises `WorkerDiedError`."""

    def __init__(self, config: EngineConfig, exit_process_on_worker_death: bool = False) -> None:
        super().__init__(config)
        self.exit_process_on_worker_death = exit_process_on_worker_death
        self.world_size = config.parallel.tensor_parallel_size
        if config.engine_args is None:
            raise ValueError("tensor parallelism needs the EngineArgs the config was built from")
        self._dir = tempfile.mkdtemp(prefix="tokenmill-tp-")
        self._ctx = zmq.Context()
        self._encoder = msgspec.msgpack.Encoder()
        self._report_decoder = msgspec.msgpack.Decoder(WorkerMessage)
        self._procs: list[subprocess.Popen] = []
        self._step_socks: list[zmq.Socket] = []
        self._from_workers = self._ctx.socket(zmq.PULL)
        self._from_workers.bind(f"ipc://{self._dir}/from-workers")
        self._failures: dict[int, str] = {}
        self.dead_reason: str | None = None
        self._step_started: float | None = None
        self._closing = False
        self._unsent_tokens: dict[str, list[int]] = {}  # read back since the last WorkerStep
        self._replies: queue.Queue[WorkerReply] = queue.Queue()  # the watchdog hands them over
        atexit.register(self.shutdown)

        num_threads = self._split_cpu_threads()
        init = WorkerInit(engine_args_msgpack=msgspec.msgpack.encode(config.engine_args), num_threads=num_threads)
        for rank in range(1, self.world_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            addr = f"ipc://{self._dir}/to-rank{rank}"
            sock.bind(addr)
            self._step_socks.append(sock)
            self._procs.append(self._spawn(rank, addr))
        try:
            self._wait_ready(self._encoder.encode(init))
            threading.Thread(target=self._watchdog, daemon=True, name="tp-watchdog").start()
            self.tp = init_tensor_parallel(0, self.world_size, config.device, f"{self._dir}/store",
                                           config.kernels, config.model.dtype)
            self._worker = make_worker(config, self.tp)
        except BaseException:
            self.shutdown()
            raise

    # ----- start-up -----
    def _split_cpu_threads(self) -> int:
        """On CPU the ranks share the cores: each gets its share (rank 0 included)."""
        if self.config.device.type != "cpu":
            return 0
        threads = max(1, torch.get_num_threads() // self.world_size)
        torch.set_num_threads(threads)
        return threads

    def _spawn(self, rank: int, addr: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "tokenmill.executor.worker_process", "--rank", str(rank),
               "--world-size", str(self.world_size), "--store", f"{self._dir}/store",
               "--driver-addr", addr, "--report-addr", f"ipc://{self._dir}/from-workers",
               "--parent-pid", str(os.getpid())]
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL)

    def _wait_ready(self, init_frame: bytes) -> None:
        """Hand each worker its WorkerInit once it connects, then wait for every WorkerReady."""
        decoder = self._report_decoder
        ready: set[int] = set()
        unsent = list(self._step_socks)
        deadline = time.monotonic() + WORKER_START_TIMEOUT_S
        while len(ready) < self.world_size - 1:
            for sock in list(unsent):
                if sock.poll(0, zmq.POLLOUT):  # a PUSH socket is writable once its peer connected
                    sock.send(init_frame)
                    unsent.remove(sock)
            if self._from_workers.poll(200):
                msg = decoder.decode(self._from_workers.recv())
                if isinstance(msg, WorkerReady):
                    ready.add(msg.rank)
                else:
                    raise WorkerDiedError(f"tensor-parallel rank {msg.rank} failed to start: {msg.message}")
            if (dead := self._first_dead_worker()) is not None:
                raise WorkerDiedError(f"tensor-parallel rank {dead[0]} exited during start-up (code {dead[1]})")
            if time.monotonic() > deadline:
                raise WorkerDiedError(f"tensor-parallel workers not ready after {WORKER_START_TIMEOUT_S:.0f}s")

    # ----- what EngineCore calls -----
    @property
    def driver_worker(self) -> Worker:
        return self._worker

    def determine_num_blocks(self) -> int:
        return self._worker.determine_num_blocks()  # all ranks agree on the smallest

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._worker.initialize_kv_cache(num_blocks)

    def launch(self, sched: SchedulerOutput) -> "_ExecutorStepFuture":
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        frame = self._encoder.encode(WorkerStep(sched, self._unsent_tokens))
        self._unsent_tokens = {}
        for sock in self._step_socks:
            sock.send(frame, copy=False)
        return _ExecutorStepFuture(self, self._guarded(self._worker.launch, sched))

    def run_on_workers(self, call: WorkerCall, tensors: list[torch.Tensor] | None = None,
                       ipc_handles: dict | None = None) -> list[Any]:
        """Send `call` to every worker, run it on rank 0, then wait for every WorkerReply (a worker
        dying meanwhile raises WorkerDiedError). The first failure, rank 0's first, is raised."""
        if self.dead_reason is not None:
            raise WorkerDiedError(self.dead_reason)
        frame = self._encoder.encode(call)
        for sock in self._step_socks:
            sock.send(frame)
        local_error: Exception | None = None
        result = None
        try:
            result = self._guarded(self._worker.handle, call, tensors, ipc_handles)
        except WorkerDiedError:
            raise
        except Exception as exc:  # noqa: BLE001 - raised once the other ranks answered
            local_error = exc
        replies = sorted(self._wait_for_replies(), key=lambda r: r.rank)
        if local_error is not None:
            raise local_error
        for reply in replies:
            if not reply.ok:
                raise RuntimeError(f"tensor-parallel rank {reply.rank}: {reply.error}")
        return [result] + [msgspec.msgpack.decode(r.result) if r.result else None for r in replies]

    def _wait_for_replies(self) -> list[WorkerReply]:
        replies = []
        while len(replies) < self.world_size - 1:
            try:
                replies.append(self._replies.get(timeout=WATCHDOG_POLL_S))
            except queue.Empty:
                if self.dead_reason is not None:
                    raise WorkerDiedError(self.dead_reason) from None
        return replies

    def _guarded(self, fn, *args):
        """Run a step's part on rank 0, turning a failure caused by a dead rank into WorkerDiedError."""
        self._step_started = time.monotonic()
        try:
            return fn(*args)
        except Exception as exc:
            # gloo notices a dead peer (connection reset) before the watchdog's next poll.
            reason = self.dead_reason or self._dead_worker_reason(wait_s=1.0)
            if reason is not None:
                raise WorkerDiedError(reason) from exc
            raise
        finally:
            self._step_started = None

    def _read_back(self, output: ModelRunnerOutput) -> None:
        unsent = self._unsent_tokens
        for request_id, token in output.sampled_token_ids.items():
            unsent.setdefault(request_id, []).append(token)

    # ----- failure and shutdown -----
    def _first_dead_worker(self) -> tuple[int, int] | None:
        """(rank, exit code) of a worker that has exited, if any."""
        for rank, proc in enumerate(self._procs, start=1):
            if proc.poll() is not None:
                return rank, proc.returncode
        return None

    def _dead_worker_reason(self, wait_s: float) -> str | None:
        deadline = time.monotonic() + wait_s
        while (dead := self._first_dead_worker()) is None:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)
        return f"tensor-parallel rank {dead[0]} exited (code {dead[1]})"

    def _drain_reports(self) -> None:
        """Keep the reasons workers sent before exiting (watchdog thread only: ZMQ sockets are not
        thread-safe, and start-up has finished reading this one by then)."""
        while self._from_workers.poll(0):
            msg = self._report_decoder.decode(self._from_workers.recv())
            if isinstance(msg, WorkerFailed):
                self._failures[msg.rank] = msg.message
            elif isinstance(msg, WorkerReply):
                self._replies.put(msg)

    def _watchdog(self) -> None:
        while not self._closing:
            self._drain_reports()
            dead = self._first_dead_worker()
            if dead is not None and not self._closing:
                self._on_worker_death(*dead)
                return
            time.sleep(WATCHDOG_POLL_S)

    def _on_worker_death(self, rank: int, code: int) -> None:
        time.sleep(WATCHDOG_POLL_S)  # let its WorkerFailed message arrive
        self._drain_reports()
        detail = f": {self._failures[rank]}" if rank in self._failures else ""
        self.dead_reason = f"tensor-parallel rank {rank} exited (code {code}){detail}"
        logger.error("%s; stopping the other ranks", self.dead_reason)
        self._kill_workers()
        if self.exit_process_on_worker_death:
            logger.critical("engine core exits: %s", self.dead_reason)
            os._exit(1)
        started = self._step_started
        if started is not None:
            time.sleep(max(0.0, started + STUCK_STEP_GRACE_S - time.monotonic()))
            if self._step_started is not None:
                logger.critical("a step is blocked waiting for the dead rank; ending the process")
                os._exit(1)

    def _kill_workers(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs:
            proc.wait()

    def shutdown(self) -> None:
        """Stop the workers (asking first), leave the process group, remove the socket dir."""
        if self._closing:
            return
        self._closing = True
        for sock in self._step_socks:
            try:
                sock.send(self._encoder.encode(WorkerShutdown()), flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        deadline = time.monotonic() + 10
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_workers()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.shutdown()
        tp = getattr(self, "tp", None)
        if tp is not None:
            tp.destroy()
        for sock in [*self._step_socks, self._from_workers]:
            sock.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
        atexit.unregister(self.shutdown)


class _ExecutorStepFuture:
    """Rank 0's StepFuture; reading it queues the tokens for the workers' next message."""

    __slots__ = ("_executor", "_future")

    def __init__(self, executor: MultiprocExecutor, future) -> None:
        self._executor = executor
        self._future = future

    def result(self) -> ModelRunnerOutput:
        output = self._executor._guarded(self._future.result)
        self._executor._read_back(output)
        return output
