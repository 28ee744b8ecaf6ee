"""A worker: one rank's device, its share of the model (the `ModelRunner`) and its KV pool.

The executor (`executor/`) makes one per rank and calls the same methods on each: size the KV pool
(every rank agrees on the smallest), allocate it, capture CUDA graphs, then run steps.
"""

from __future__ import annotations

import gc
import logging
import math
import os

import torch

from tokenmill.config.engine_config import EngineConfig
from tokenmill.config.kv_sizing import (CPU_POOL_MAX_FRACTION, available_memory_bytes, default_cpu_kv_cache_bytes,
                                        total_memory_bytes)
from tokenmill.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.registry import weight_bytes_per_rank
from tokenmill.worker.model_runner import ModelRunner, StepFuture

logger = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, tp: TensorParallelGroup) -> None:
        self.config = config
        self.tp = tp
        self.device = config.device
        torch.manual_seed(config.model.seed)
        self._memory_at_start = self._gpu_memory_baseline() if self.device.type == "cuda" else None
        self._check_weights_fit()
        self.runner = ModelRunner(config, tp)
        self.num_blocks = 0

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
        self.runner.shutdown()
