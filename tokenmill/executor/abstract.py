"""The executor interface: how the engine core reaches the workers, whether one or many.

The engine core calls the same methods whatever the executor: size the KV pool, initialise it,
launch steps. `UniprocExecutor` (`uniproc.py`) runs one worker in the caller's process;
`MultiprocExecutor` (`multiproc.py`) runs rank 0 there and ranks 1..N-1 in worker processes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.worker.worker import Worker


class StepHandle(Protocol):
    def result(self) -> ModelRunnerOutput: ...


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @property
    @abstractmethod
    def driver_worker(self) -> Worker:
        """Rank 0's worker (in this process): the one that samples."""

    @abstractmethod
    def determine_num_blocks(self) -> int:
        """KV blocks every rank can hold (the smallest)."""

    @abstractmethod
    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the KV pools and capture the decode graphs, on every rank."""

    @abstractmethod
    def launch(self, sched: SchedulerOutput) -> StepHandle:
        """Enqueue one step on every rank; `result()` waits for rank 0's sampled tokens."""

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.launch(sched).result()

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every rank and free the device memory (the executor cannot step afterwards)."""
