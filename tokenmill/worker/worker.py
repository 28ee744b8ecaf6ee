"""A worker: one rank's device, its share of the model (the `ModelRunner`) and its KV pool.

The executor (`executor/`) makes one per rank and calls the same methods on each: size the KV pool
(every rank agrees on the smallest), allocate it, capture CUDA graphs, then run steps. Between
steps it may hand every rank a `worker/control.py` call (`handle`): sleep and wake, weight
updates from each source, and `collective_rpc` extension methods (`worker_extension_cls`, a
class whose methods are mixed into the worker, vLLM's idea: see `make_worker`).
"""

from __future__ import annotations

import gc
import importlib
import logging
import math
import os
import pickle
from typing import Any, Iterable

import msgspec
import torch

from tokenmill.config.engine_config import EngineConfig
from tokenmill.config.kv_sizing import (CPU_POOL_MAX_FRACTION, available_memory_bytes, default_cpu_kv_cache_bytes,
                                        total_memory_bytes)
from tokenmill.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.distributed.weight_transfer import TensorSpec, buckets
from tokenmill.model.registry import process_weights_after_loading, weight_bytes_per_rank
from tokenmill.worker import control
from tokenmill.worker.model_runner import ModelRunner, StepFuture
from tokenmill.worker.sleep_mode import WeightOffload, return_device_memory
from tokenmill.worker.weight_update import InPlaceUpdate, iter_checkpoint

logger = logging.getLogger(__name__)


def make_worker(config: EngineConfig, tp: TensorParallelGroup) -> "Worker":
    """A `Worker`, with the methods of `config.parallel.worker_extension_cls` ("pkg.mod.Class")
    mixed in, where one is named (its methods see the worker as `self`: `self.model`, ...)."""
    name = config.parallel.worker_extension_cls
    if not name:
        return Worker(config, tp)
    module_name, _, class_name = name.rpartition(".")
    try:
        extension = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ValueError(f"worker_extension_cls {name!r} cannot be imported: {exc}") from None
    clashes = sorted(n for n in vars(extension) if not n.startswith("__") and hasattr(Worker, n))
    if clashes:
        raise ValueError(f"worker_extension_cls {name!r} redefines Worker's {', '.join(clashes)}")
    cls = type(f"Worker[{class_name}]", (Worker, extension), {"extension_methods": frozenset(
        n for n in dir(extension) if not n.startswith("_") and callable(getattr(extension, n)))})
    return cls(config, tp)


class Worker:
    # Worker methods `collective_rpc` may call besides an extension's: what RL frameworks call on
    # vLLM's workers (checkpoint-engine's `update_weights_from_ipc`, `report_device_id`).
    rpc_methods = frozenset({"update_weights_from_ipc", "report_device_id"})
    # (`load_weights` is for extension methods: its tensors cannot come through collective_rpc.)
    extension_methods: frozenset[str] = frozenset()

    def __init__(self, config: EngineConfig, tp: TensorParallelGroup) -> None:
        self.config = config
        self.tp = tp
        self.device = config.device
        torch.manual_seed(config.model.seed)
        self._memory_at_start = self._gpu_memory_baseline() if self.device.type == "cuda" else None
        self._check_weights_fit()
        self.runner = ModelRunner(config, tp)
        self.num_blocks = 0
        self._offload: WeightOffload | None = None  # the weights while asleep
        self.kv_asleep = False
        self._update_groups: dict[str, Any] = {}  # group name -> process group with a trainer
        self._zmq_context = None

    @property
    def model(self):
        return self.runner.model

    @property
    def graphs(self):
        return self.runner.graphs

    # ----- KV pool -----
    def determine_num_blocks(self) -> int:
        """KV blocks for this rank's pool; every tensor-parallel rank agrees on the smallest.
        Explicit sizes first (`num_gpu_blocks_override`, then `kv_cache_memory`); otherwise what
        `gpu_memory_utilization` leaves on a GPU, or the CPU default (`config/kv_sizing.py`)."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override:
            return cache.num_gpu_blocks_override
        bytes_per_block = self.runner.kv_cache_bytes_per_block()
        sched = self.config.scheduler
        if bytes_per_block == 0 and not cache.num_state_slots:
            # No cache (an encoder): blocks only count tokens, and each step's requests end in it.
            return -(-sched.max_num_batched_tokens // cache.block_size) + sched.max_num_seqs
        if self.device.type == "cuda":
            budget = self._profile_gpu_kv_budget()  # also compiles the prefill kernels: always run it
            if cache.kv_cache_memory:
                budget = cache.kv_cache_memory
        else:
            budget = cache.kv_cache_memory
            world = self.tp.world_size
            if not budget and bytes_per_block == 0:  # only recurrent state to hold
                budget = int(total_memory_bytes() // world * CPU_POOL_MAX_FRACTION)
            elif not budget:
                budget, reason = default_cpu_kv_cache_bytes(
                    bytes_per_block // cache.block_size, self.config.model.max_model_len,
                    self.config.scheduler.max_num_seqs, available_memory_bytes() // world,
                    total_memory_bytes() // world)
                logger.info("%s", reason)
        # A hybrid model's state slots (a fixed count, config/engine_args.py) come out of the same
        # budget first; the blocks take the rest.
        state_bytes = cache.num_state_slots * self.runner.state_bytes_per_slot()
        if state_bytes:
            if state_bytes >= budget:
                raise ValueError(
                    f"the {cache.num_state_slots} recurrent-state slots of this hybrid model need "
                    f"{state_bytes / 2**30:.2f} GiB, more than the {budget / 2**30:.2f} GiB left for the "
                    f"cache: lower --max-num-seqs (slots: one per running request, twice that with "
                    f"prefix caching) or give the cache more memory")
            budget -= state_bytes
            logger.info("state slots: %d x %.1f MiB", cache.num_state_slots, self.runner.state_bytes_per_slot() / 2**20)
        if bytes_per_block == 0:  # only linear-attention layers: blocks are bookkeeping only
            return -(-self.config.model.max_model_len // cache.block_size) * sched.max_num_seqs
        return self.tp.all_reduce_min(max(1, int(budget // bytes_per_block)))

    def initialize_kv_cache(self, num_blocks: int) -> None:
        """Allocate the pool, then capture the decode graphs that read it."""
        self.runner.allocate_kv_cache(num_blocks)
        self.num_blocks = num_blocks
        self.runner.capture_cuda_graphs()

    def _check_weights_fit(self) -> None:
        """Refuse, before loading anything, a model whose weights alone exceed this rank's memory:
        `gpu_memory_utilization` of the GPU, or the host's physical memory on the CPU."""
        weights = weight_bytes_per_rank(self.config, self.tp)
        name = self.config.model.served_model_name
        shard = (f"{weights / 2**30:.1f} GiB of weights per rank "
                 f"({str(self.config.model.dtype).removeprefix('torch.')}, tensor_parallel_size={self.tp.world_size})")
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            budget = total * self.config.cache.gpu_memory_utilization
            if weights > budget:
                needed = math.ceil(weights * self.tp.world_size / budget)
                raise ValueError(
                    f"{name} needs {shard}, more than {self.device} offers ({budget / 2**30:.1f} GiB: "
                    f"gpu_memory_utilization={self.config.cache.gpu_memory_utilization} of {total / 2**30:.1f} "
                    f"GiB): it needs about {needed} GPUs of this size on one host (--tensor-parallel-size)")
        else:
            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            if weights > budget:
                raise ValueError(f"{name} needs {shard}, more than this host's {budget / 2**30:.1f} GiB of memory "
                                 f"(CPU ranks share it: no tensor-parallel size helps)")

    def _gpu_memory_baseline(self) -> tuple[int, int, int]:
        """Before anything is loaded: refuse to start where `gpu_memory_utilization` of the GPU is
        more than is free (other processes hold the rest), rather than find out at the KV pool.
        Returns (free, torch reserved, torch allocated) now: the baseline `_profile_gpu_kv_budget`
        measures this engine's own use from."""
        # An earlier engine's tensors in this process are free memory once collected (reference
        # cycles can keep a shut-down engine's objects alive until then) and returned to CUDA.
        gc.collect()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        cache = self.config.cache
        wanted = total * cache.gpu_memory_utilization
        if not cache.pool_size_given and wanted > free:
            raise ValueError(
                f"{self.device} has {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, less than "
                f"gpu_memory_utilization={cache.gpu_memory_utilization} asks for ({wanted / 2**30:.1f} GiB): "
                f"lower --gpu-memory-utilization, or free the memory other processes hold")
        return free, torch.cuda.memory_reserved(self.device), torch.cuda.memory_allocated(self.device)

    def _profile_gpu_kv_budget(self) -> float:
        """Run the largest batch once, then give the KV pool what `gpu_memory_utilization` of the
        GPU leaves after this engine's own use: weights and peak activations (torch's allocator),
        and what it holds outside torch (CUDA context growth, NCCL and symmetric-memory buffers),
        both measured from the start-up baseline. Memory other processes hold is not charged: the
        fraction is this engine's share, as in vLLM (two engines at 0.45 can share one GPU)."""
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.runner.profile_run()
        torch.cuda.synchronize()
        free_at_start, reserved_at_start, allocated_at_start = self._memory_at_start
        free, total = torch.cuda.mem_get_info(self.device)
        torch_peak = torch.cuda.max_memory_allocated(self.device) - allocated_at_start
        outside_torch = (free_at_start - free) - (torch.cuda.memory_reserved(self.device) - reserved_at_start)
        return total * self.config.cache.gpu_memory_utilization - torch_peak - max(0, outside_torch)

    # ----- steps -----
    def launch(self, sched: SchedulerOutput) -> StepFuture:
        return self.runner.launch(sched)

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        return self.runner.execute(sched)

    def append_sampled_tokens(self, sampled: dict[str, list[int]]) -> None:
        self.runner.append_sampled_tokens(sampled)

    def shutdown(self) -> None:
        """Free the device memory this rank holds (the worker cannot step afterwards)."""
        for name in list(self._update_groups):
            self.destroy_weights_update_group(name)
        self.runner.shutdown()
        if self._zmq_context is not None:
            self._zmq_context.term()

    # ----- calls between steps (worker/control.py) -----
    def handle(self, call: control.WorkerCall, tensors: list[torch.Tensor] | None = None,
               ipc_handles: dict | None = None) -> Any:
        """Run one between-steps call. `tensors` (for `LoadWeightsFromDriver`) and `ipc_handles`
        (for `LoadWeightsFromIpcHandles`): rank 0's in-process data; other ranks pass None."""
        if isinstance(call, control.Sleep):
            return self.sleep(call.level)
        if isinstance(call, control.WakeUp):
            return self.wake_up(call.tags)
        if isinstance(call, control.LoadWeightsFromDisk):
            return self.update_weights_from_disk(call.path)
        if isinstance(call, control.LoadWeightsFromDriver):
            return self.update_weights_from_driver(call.specs, call.bucket_bytes, tensors)
        if isinstance(call, control.LoadWeightsFromIpcHandles):
            return self.update_weights_from_ipc_handles(
                ipc_handles if ipc_handles is not None else pickle.loads(call.handles_pickle))
        if isinstance(call, control.LoadWeightsFromIpcStream):
            return self.update_weights_from_ipc(call.zmq_handles)
        if isinstance(call, control.JoinUpdateGroup):
            return self.init_weights_update_group(call.master_address, call.master_port, call.rank_offset,
                                                  call.world_size, call.group_name, call.backend)
        if isinstance(call, control.LoadWeightsFromGroup):
            return self.update_weights_from_distributed(call.specs, call.group_name, call.bucket_bytes)
        if isinstance(call, control.LeaveUpdateGroup):
            return self.destroy_weights_update_group(call.group_name)
        if isinstance(call, control.ExtensionCall):
            args, kwargs = msgspec.msgpack.decode(call.payload)
            return self.call_method(call.method, args, kwargs)
        raise TypeError(f"not a worker call: {type(call).__name__}")

    def call_method(self, method: str, args: list, kwargs: dict) -> Any:
        """`collective_rpc`'s target: an extension method or one of `rpc_methods`."""
        if method not in self.extension_methods and method not in self.rpc_methods:
            allowed = sorted(self.extension_methods | self.rpc_methods)
            raise ValueError(f"collective_rpc: {method!r} is not a worker extension method "
                             f"(callable: {', '.join(allowed)}; set worker_extension_cls for more)")
        return getattr(self, method)(*args, **kwargs)

    def report_device_id(self) -> str:
        """This rank's device UUID, the key of its address in `update_weights_from_ipc`."""
        from tokenmill.distributed.ipc_weights import device_uuid
        return device_uuid(self.device)

    # ----- sleep -----
    @property
    def weights_asleep(self) -> bool:
        return self._offload is not None

    def sleep(self, level: int) -> None:
        """Give the device memory back: KV pool and graphs dropped; weights to host memory
        (level 1) or dropped (level 2)."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.weights_asleep or self.kv_asleep:
            raise RuntimeError("the engine is already asleep")
        self.runner.release_kv_cache()
        self.kv_asleep = True
        self._offload = WeightOffload(self.model, self.device, keep_copy=level == 1)
        return_device_memory(self.device)

    def wake_up(self, tags: list[str]) -> None:
        """Take back the memory of `tags` ("weights", "kv_cache"); graphs are recaptured once both
        are back. Weights dropped at level 2 come back uninitialised: load new ones."""
        if self.weights_asleep and "weights" in tags:
            self._offload.restore(self.model)
            self._offload = None
            process_weights_after_loading(self.model)
        if self.kv_asleep and "kv_cache" in tags:
            self.runner.allocate_kv_cache(self.num_blocks)
            self.kv_asleep = False
        if not self.kv_asleep and not self.weights_asleep and not self.runner.graphs_ready:
            self.runner.capture_cuda_graphs()  # over the pool and weights, once both are back

    # ----- weight updates -----
    def _update(self) -> InPlaceUpdate:
        if self.weights_asleep:
            raise RuntimeError("the weights are asleep: wake_up(tags=['weights']) before updating them")
        return InPlaceUpdate(self.runner)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Load `(hf_name, tensor)` pairs into the running model, in place (any subset; this
        rank takes its shard). For worker extensions: vLLM's `model_runner.model.load_weights`.
        Returns how many parameters were written."""
        with self._update() as update:
            update.load(weights)
        return len(update.loaded)

    def update_weights_from_disk(self, path: str) -> int:
        """Load a checkpoint's tensors (any subset of the model's) from `path`."""
        return self.load_weights(iter_checkpoint(path, self.config.model.hf_config))

    def update_weights_from_driver(self, specs: list[TensorSpec], bucket_bytes: int,
                                   tensors: list[torch.Tensor] | None) -> int:
        """Rank 0 passes the tensors of `specs` (its caller's); with tensor parallelism it
        broadcasts them over the tensor-parallel group, a bucket at a time, and every rank loads
        its shard of each."""
        if self.tp.is_driver and (tensors is None or len(tensors) != len(specs)):
            raise ValueError("rank 0 needs one tensor per spec")
        by_spec = iter(tensors) if self.tp.is_driver else None
        with self._update() as update:
            for bucket in buckets(specs, bucket_bytes):
                batch = []
                for spec in bucket:
                    if by_spec is not None:
                        t = next(by_spec)
                        if self.tp.world_size > 1:
                            t = t.to(self.device).contiguous()
                    else:
                        t = torch.empty(spec.shape, dtype=spec.torch_dtype, device=self.device)
                    self.tp.broadcast_from_driver(t)
                    batch.append((spec.name, t))
                update.load(batch)
        return len(update.loaded)

    def update_weights_from_ipc_handles(self, handles: dict[str, dict[str, tuple]]) -> int:
        """vLLM's colocated form: `{device_uuid: {name: torch IPC handle}}`; each rank opens the
        handles of its own device."""
        from tokenmill.distributed.ipc_weights import device_uuid, open_shared
        mine = handles.get(device_uuid(self.device))
        if mine is None:
            raise ValueError(f"no IPC handles for this rank's device {device_uuid(self.device)}")
        return self.load_weights((name, open_shared(handle, self.device)) for name, handle in mine.items())

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> int:
        """checkpoint-engine's protocol (`distributed/ipc_weights.py`): serve the sender at this
        rank's device's address until it ends the update."""
        import zmq

        from tokenmill.distributed.ipc_weights import device_uuid, receive_ipc_stream
        address = zmq_handles.get(device_uuid(self.device))
        if address is None:
            raise ValueError(f"no ZMQ address for this rank's device {device_uuid(self.device)}")
        if self._zmq_context is None:
            self._zmq_context = zmq.Context()
        with self._update() as update:
            receive_ipc_stream(self._zmq_context, address, self.device, update.load)
        return len(update.loaded)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str) -> None:
        """Join a trainer's group (trainer rank 0, this rank `rank_offset + tp rank`)."""
        from tokenmill.distributed.weight_transfer import init_custom_process_group
        if group_name in self._update_groups:
            raise ValueError(f"weight update group {group_name!r} already exists")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("the nccl backend needs a CUDA engine; use gloo on the CPU")
        rank = rank_offset + self.tp.rank
        if not 0 < rank < world_size:
            raise ValueError(f"rank {rank} (rank_offset {rank_offset} + tensor-parallel rank {self.tp.rank}) "
                             f"is not in 1..{world_size - 1}: rank 0 is the trainer")
        self._update_groups[group_name] = init_custom_process_group(
            backend, f"tcp://{master_address}:{master_port}", world_size, rank, group_name)

    def update_weights_from_distributed(self, specs: list[TensorSpec], group_name: str, bucket_bytes: int) -> int:
        """Receive the trainer's broadcast of `specs` in buckets and load each."""
        from tokenmill.distributed.weight_transfer import receive_broadcast
        group = self._update_groups.get(group_name)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}: call init_weights_update_group first")
        with self._update() as update:
            for batch in receive_broadcast(group, specs, self.device, bucket_bytes):
                update.load(batch)
        return len(update.loaded)

    def destroy_weights_update_group(self, group_name: str) -> None:
        from tokenmill.distributed.weight_transfer import destroy_group
        group = self._update_groups.pop(group_name, None)
        if group is None:
            raise ValueError(f"no weight update group {group_name!r}")
        destroy_group(group)
