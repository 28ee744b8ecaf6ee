"""The executor interface: how the engine core reaches the workers, whether one or many.

The engine core calls the same methods whatever the executor: size the KV pool, initialise it,
launch steps, and between steps run a control call on every rank (`run_on_workers`: sleep, wake,
weight updates, `collective_rpc`; the typed methods below build the call). `UniprocExecutor`
(`uniproc.py`) runs one worker in the caller's process; `MultiprocExecutor` (`multiproc.py`) runs
rank 0 there and ranks 1..N-1 in worker processes.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from typing import Any, Protocol

import msgspec
import torch

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.distributed.weight_transfer import DEFAULT_BUCKET_BYTES, TensorSpec
from tokenmill.worker import control
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
    def run_on_workers(self, call: control.WorkerCall, tensors: list[torch.Tensor] | None = None,
                       ipc_handles: dict | None = None) -> list[Any]:
        """Run `call` on every rank (between steps) and return each rank's result, rank 0 first.
        `tensors` / `ipc_handles`: rank 0's in-process data for the calls that take it."""

    # ----- the control calls, typed -----
    def sleep(self, level: int) -> None:
        self.run_on_workers(control.Sleep(level))

    def wake_up(self, tags: list[str]) -> None:
        self.run_on_workers(control.WakeUp(tags))

    def update_weights_from_disk(self, path: str) -> int:
        return self.run_on_workers(control.LoadWeightsFromDisk(path))[0]

    def update_weights_from_tensors(self, named_tensors: list[tuple[str, torch.Tensor]],
                                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
        specs = [TensorSpec.of(name, t) for name, t in named_tensors]
        return self.run_on_workers(control.LoadWeightsFromDriver(specs, bucket_bytes),
                                   tensors=[t for _, t in named_tensors])[0]

    def update_weights_from_ipc_handles(self, handles: dict[str, dict[str, tuple]]) -> int:
        # Pickled only for the ranks in other processes (rank 0 takes the dict as it is).
        blob = pickle.dumps(handles) if self.config.parallel.tensor_parallel_size > 1 else b""
        return self.run_on_workers(control.LoadWeightsFromIpcHandles(blob), ipc_handles=handles)[0]

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> int:
        return self.run_on_workers(control.LoadWeightsFromIpcStream(zmq_handles))[0]

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> None:
        self.run_on_workers(control.JoinUpdateGroup(master_address, master_port, rank_offset, world_size,
                                                    group_name, backend))

    def update_weights_from_distributed(self, specs: list[TensorSpec], group_name: str,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
        return self.run_on_workers(control.LoadWeightsFromGroup(specs, group_name, bucket_bytes))[0]

    def destroy_weights_update_group(self, group_name: str) -> None:
        self.run_on_workers(control.LeaveUpdateGroup(group_name))

    def collective_rpc(self, method: str, args: tuple | list = (), kwargs: dict | None = None) -> list[Any]:
        """`method(*args, **kwargs)` on every rank's worker (an extension method; arguments and
        results msgpack-encodable: they cross processes)."""
        payload = msgspec.msgpack.encode([list(args), kwargs or {}])
        return self.run_on_workers(control.ExtensionCall(method, payload))

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every rank and free the device memory (the executor cannot step afterwards)."""
