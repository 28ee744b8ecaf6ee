"""What the driver (rank 0) and the other tensor-parallel ranks say to each other, as msgspec
msgpack (typed, never pickle).

driver -> worker, on one ZMQ PUSH socket per worker:
    WorkerInit once (the EngineArgs to rebuild the same EngineConfig), then a WorkerStep per engine
    step, then WorkerShutdown.
worker -> driver, on one shared PULL socket:
    WorkerReady once its config resolved (so start-up errors surface before any collective), or
    WorkerFailed with the reason, just before a worker exits on an error.
"""

from __future__ import annotations

from typing import Union

import msgspec

from tokenmill.core.scheduler_output import SchedulerOutput


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


DriverMessage = Union[WorkerInit, WorkerStep, WorkerShutdown]


class WorkerReady(msgspec.Struct, tag="ready"):
    rank: int
    pid: int


class WorkerFailed(msgspec.Struct, tag="failed"):
    rank: int
    message: str


WorkerMessage = Union[WorkerReady, WorkerFailed]
