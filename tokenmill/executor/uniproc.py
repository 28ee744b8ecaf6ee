"""One worker, in the engine core's process (a single GPU, or the CPU)."""

from __future__ import annotations

from typing import Any

import torch

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.scheduler_output import SchedulerOutput
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.executor.abstract import Executor
from tokenmill.worker.control import WorkerCall
from tokenmill.worker.model_runner import StepFuture
from tokenmill.worker.worker import Worker, make_worker


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._worker = make_worker(config, TensorParallelGroup.single(config.device))

    @property
    def driver_worker(self) -> Worker:
        return self._worker

    def determine_num_blocks(self) -> int:
        return self._worker.determine_num_blocks()

    def initialize_kv_cache(self, num_blocks: int) -> None:
        self._worker.initialize_kv_cache(num_blocks)

    def launch(self, sched: SchedulerOutput) -> StepFuture:
        return self._worker.launch(sched)

    def run_on_workers(self, call: WorkerCall, tensors: list[torch.Tensor] | None = None,
                       ipc_handles: dict | None = None) -> list[Any]:
        return [self._worker.handle(call, tensors, ipc_handles)]

    def shutdown(self) -> None:
        self._worker.shutdown()
