"""What the driver (rank 0) and the other tensor-parallel ranks say to each other, as msgspec
msgpack (typed, never pickle).

driver -> worker, on one ZMQ PUSH socket per worker:
    WorkerInit once (the EngineArgs to rebuild the same EngineConfig), then a WorkerStep per engine
    step, between steps any `worker/control.py` call (sleep, wake, weight updates, collective_rpc:
    the same structs the driver's own worker handles), then WorkerShutdown.
worker -> driver, on one shared PULL socket:
    WorkerReady once its config resolved (so start-up errors surface before any collective), or
    WorkerFailed with the reason, just before a worker exits on an error; a WorkerReply after
    each control call.

One control call carries pickle, as opaque bytes inside its typed struct: the torch CUDA IPC
handles of `update_weights_from_ipc_handles`, which nothing else can carry (a rebuild function and
its arguments; `LoadWeightsFromIpcHandles`).
"""

from __future__ import annotations

from typing import Union

import msgspec

from tokenmill.core.scheduler_output import SchedulerOutput
from tokenmill.worker.control import WORKER_CALL_TYPES


class WorkerInit(msgspec.Struct, tag="init"):
    engine_args_msgpack: bytes
    num_threads: int  # CPU intra-op threads for this rank (0: leave torch's default)


class WorkerStep(msgspec.Struct, tag="step", gc=False):
    """One engine step. `sampled_token_ids` are the tokens rank 0 read back since its previous
    message (one per request, two when an async step was followed by a synchronous one): workers
    append them to their request states before building this step's inputs."""

    scheduler_output: SchedulerOutput
    sampled_token_ids: dict[str, list[int]]


class WorkerShutdown(msgspec.Struct, tag="shutdown"):
    pass


DriverMessage = Union[(WorkerInit, WorkerStep, WorkerShutdown) + WORKER_CALL_TYPES]


class WorkerReady(msgspec.Struct, tag="ready"):
    rank: int
    pid: int


class WorkerFailed(msgspec.Struct, tag="failed"):
    rank: int
    message: str


class WorkerReply(msgspec.Struct, tag="reply"):
    """A control call's outcome on one rank: its msgpack-encoded result, or the error."""

    rank: int
    ok: bool
    error: str = ""
    result: bytes = b""


WorkerMessage = Union[WorkerReady, WorkerFailed, WorkerReply]
