"""Executors: how the engine core reaches its workers (`abstract.Executor`)."""

from __future__ import annotations

from tokenmill.config.engine_config import EngineConfig
from tokenmill.executor.abstract import Executor


def make_executor(config: EngineConfig, exit_process_on_worker_death: bool = False) -> Executor:
    """One rank in this process, or worker processes for the other tensor-parallel ranks."""
    if config.parallel.tensor_parallel_size == 1:
        from tokenmill.executor.uniproc import UniprocExecutor
        return UniprocExecutor(config)
    from tokenmill.executor.multiproc import MultiprocExecutor
    return MultiprocExecutor(config, exit_process_on_worker_death)
