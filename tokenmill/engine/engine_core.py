"""The engine core: the step loop that schedules, runs the model and reports new tokens.

It knows nothing about text or HTTP. The offline `LLM` runs it in-process; the server runs it in
its own process behind ZMQ (`engine/core_process.py`).

With async scheduling (the default on CUDA) a step schedules and launches step N+1, then reads
step N's sampled tokens and updates the scheduler with them: the host's bookkeeping for N overlaps
the GPU's work on N+1, instead of the GPU idling while the host catches up. While a request whose
sampling reads its previous tokens (penalties, a grammar) is live, steps run one at a time.

Between steps the engine also takes the RL calls (docs/rl.md): sleep and wake, pause and resume,
prefix-cache reset, weight updates and `collective_rpc`. Each first finishes the step in flight
(its outputs go out with the next `step()`), so the executor runs it between steps on every rank;
every call that may change the weights also drops the prefix cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable, NamedTuple

import torch

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.messages import EngineOutput, EngineOutputs, EngineRequest, FinishReason, SchedulerStats
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.scheduler_output import SchedulerOutput
from tokenmill.core.state_cache import StateCache
from tokenmill.distributed.weight_transfer import DEFAULT_BUCKET_BYTES, TensorSpec
from tokenmill.executor import make_executor
from tokenmill.utils.process import freeze_long_lived_objects
from tokenmill.worker.control import SLEEP_TAGS

logger = logging.getLogger(__name__)


class _LaunchedStep(NamedTuple):
    sched: SchedulerOutput
    future: object  # StepFuture: .result() -> ModelRunnerOutput


def _check_kv_capacity(config: EngineConfig, capacity_tokens: int) -> None:
    """A pool sized from free memory must hold one request of max_model_len, or such a request
    could never run: refuse to start and say what to change. A pool sized explicitly
    (`num_gpu_blocks_override`, `kv_cache_memory`) is taken as asked, with a warning. Where every
    KV layer slides, a request holds at most its window and one step's chunk at once."""
    max_len = config.model.max_model_len
    needed = max_len  # tokens one request can hold in the pool at once
    if config.cache.sliding_window is not None:
        needed = min(max_len, config.cache.sliding_window + config.scheduler.max_num_batched_tokens
                     + 2 * config.cache.block_size)
    if capacity_tokens >= needed:
        return
    what = f"max_model_len {max_len}" if needed == max_len else f"the {needed} tokens a windowed request holds"
    if config.cache.pool_size_given:
        logger.warning("the KV cache holds %d tokens, less than %s: long requests will be preempted repeatedly",
                       capacity_tokens, what)
        return
    raise ValueError(
        f"the KV cache fits only {capacity_tokens} tokens in the memory left for it, less than one request "
        f"of {what}: raise --gpu-memory-utilization (on a GPU) or set --kv-cache-memory, "
        f"or lower --max-model-len to at most {capacity_tokens}")


class EngineCore:
    """`exit_process_on_worker_death`: set where the engine core has a process of its own (the
    server's), so a dead tensor-parallel rank ends it at once (executor/multiproc.py)."""

    def __init__(self, config: EngineConfig, exit_process_on_worker_death: bool = False) -> None:
        self.config = config
        start = time.perf_counter()
        self.executor = make_executor(config, exit_process_on_worker_death)
        try:
            num_blocks = self.executor.determine_num_blocks()
            self.kv_capacity_tokens = num_blocks * config.cache.block_size
            _check_kv_capacity(config, self.kv_capacity_tokens)
            self.executor.initialize_kv_cache(num_blocks)
        except BaseException:
            self.executor.shutdown()  # stop any worker ranks, so a later engine in this process can start
            raise
        cache = config.cache
        states = None
        if cache.num_state_slots:  # a hybrid model: state slots beside the blocks
            states = StateCache(cache.num_state_slots, cache.state_checkpoint_interval,
                                cache.enable_prefix_caching, config.scheduler.max_num_seqs)
        self.kv_manager = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching,
                                         cache.sliding_window, states)
        self.scheduler = Scheduler(config.scheduler, self.kv_manager)
        self.async_scheduling = config.scheduler.async_scheduling
        self._in_flight: _LaunchedStep | None = None  # launched, tokens not read yet (async only)
        # Outputs of a step finished early by a call between steps, sent with the next step().
        self._held_outputs: list[EngineOutput] = []
        self._held_counts = SchedulerStats()
        self.asleep: set[str] = set()  # of SLEEP_TAGS
        self.paused = False
        freeze_long_lived_objects()
        logger.info("engine ready in %.1fs: %s (%s, %s) on %s, KV cache %d tokens (%d blocks of %d)",
                    time.perf_counter() - start, config.model.served_model_name, config.model.architecture,
                    str(config.model.dtype).removeprefix("torch."), config.device,
                    self.kv_capacity_tokens, num_blocks, config.cache.block_size)

    def add_request(self, request: EngineRequest) -> None:
        self.scheduler.add_request(Request.from_engine_request(request))

    def abort_requests(self, request_ids: Iterable[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        """Whether a `step()` would make progress (none while paused or asleep, until resumed)."""
        if self._held_outputs:
            return True
        if self.paused or self.asleep:
            return False
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> EngineOutputs:
        counts, self._held_counts = self._held_counts, SchedulerStats()  # of the steps read here
        outputs, self._held_outputs = self._held_outputs, []
        if self.paused or self.asleep:
            return self._outputs(outputs, counts)
        if self._in_flight is not None and self.scheduler.needs_synchronous_steps:
            outputs += self._finish(self._in_flight, counts)  # the next schedule needs its tokens
            self._in_flight = None
        sched = self.scheduler.schedule()
        launched = _LaunchedStep(sched, self.executor.launch(sched))
        if self._in_flight is not None:
            # Step N+1 is queued on the GPU: now wait for step N's tokens and do its bookkeeping.
            outputs += self._finish(self._in_flight, counts)
            self._in_flight = None
        if self.async_scheduling and not sched.is_empty and not self.scheduler.needs_synchronous_steps:
            self._in_flight = launched
        else:
            outputs += self._finish(launched, counts)
        return self._outputs(outputs, counts)

    def _outputs(self, outputs: list[EngineOutput], counts: SchedulerStats) -> EngineOutputs:
        stats = self.scheduler.stats()
        stats.num_generation_tokens = counts.num_generation_tokens
        stats.num_prompt_tokens = counts.num_prompt_tokens
        return EngineOutputs(outputs=outputs, scheduler_stats=stats, timestamp=time.time())

    def _finish(self, step: _LaunchedStep, counts: SchedulerStats) -> list[EngineOutput]:
        """Read a launched step's tokens and update the scheduler with them."""
        result = step.future.result()
        num_sampled = len(result.sampled_token_ids)
        counts.num_generation_tokens += num_sampled
        counts.num_prompt_tokens += step.sched.total_num_scheduled_tokens - num_sampled
        return self.scheduler.update(step.sched, result)

    # ----- between steps: RL calls (docs/rl.md) -----
    def _finish_in_flight(self) -> None:
        """Read the step in flight (async scheduling) so no step runs during the call; its
        outputs go out with the next `step()`."""
        if self._in_flight is not None:
            self._held_outputs += self._finish(self._in_flight, self._held_counts)
            self._in_flight = None

    def pause(self) -> None:
        """Stop scheduling; requests keep their place and their KV blocks until `resume`."""
        self._finish_in_flight()
        self.paused = True

    def resume(self) -> None:
        self.paused = False

    def abort_all(self) -> list[EngineOutput]:
        """Abort every unfinished request; returns an ABORT output for each (the server's
        `pause_generation(mode="abort")`)."""
        self._finish_in_flight()
        outputs, self._held_outputs = self._held_outputs, []  # their tokens come first
        request_ids = list(self.scheduler.requests)
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        return outputs + [EngineOutput(request_id, [], finish_reason=FinishReason.ABORT) for request_id in request_ids]

    def reset_prefix_cache(self) -> None:
        """No block computed before now is ever reused (blocks of running requests included:
        `KVCacheManager.reset_prefix_cache`)."""
        self._finish_in_flight()
        self.kv_manager.reset_prefix_cache()

    def is_sleeping(self) -> bool:
        return bool(self.asleep)

    def sleep(self, level: int = 1) -> None:
        """Hand the device memory back: the KV cache is dropped, the weights go to host memory
        (level 1) or are dropped (level 2: load new ones after waking). Running requests are
        preempted (recomputed after waking); nothing is scheduled until every part is awake."""
        if not self.config.model.enable_sleep_mode:
            raise ValueError("sleep mode is off: start the engine with enable_sleep_mode=True "
                             "(--enable-sleep-mode)")
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        if self.asleep:
            raise ValueError(f"the engine is already asleep ({', '.join(sorted(self.asleep))})")
        self._finish_in_flight()
        self.scheduler.preempt_all()
        self.kv_manager.reset_prefix_cache()  # the cache's contents are about to go
        self.executor.sleep(level)
        self.asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take the memory of `tags` back ("weights", "kv_cache"; None: both). Waking the weights
        first lets an update land before the KV pool takes its memory again."""
        tags = list(SLEEP_TAGS) if tags is None else list(tags)
        unknown = sorted(set(tags) - set(SLEEP_TAGS))
        if unknown:
            raise ValueError(f"unknown wake_up tags {unknown}; choose from {list(SLEEP_TAGS)}")
        if not self.asleep & set(tags):
            return
        self.executor.wake_up(tags)
        self.asleep -= set(tags)

    def _update_weights(self, update, *args) -> int:
        """Run an executor weight update between steps; the prefix cache is reset after it, also
        after a failure (some tensors may have loaded)."""
        if "weights" in self.asleep:
            raise ValueError("the weights are asleep: wake_up(tags=['weights']) before updating them")
        self._finish_in_flight()
        try:
            return update(*args)
        finally:
            self.kv_manager.reset_prefix_cache()

    def update_weights_from_disk(self, path: str) -> int:
        return self._update_weights(self.executor.update_weights_from_disk, path)

    def update_weights_from_tensors(self, named_tensors: list[tuple[str, torch.Tensor]],
                                    bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
        return self._update_weights(self.executor.update_weights_from_tensors, named_tensors, bucket_bytes)

    def update_weights_from_ipc_handles(self, handles: dict[str, dict[str, tuple]]) -> int:
        return self._update_weights(self.executor.update_weights_from_ipc_handles, handles)

    def update_weights_from_ipc(self, zmq_handles: dict[str, str]) -> int:
        return self._update_weights(self.executor.update_weights_from_ipc, zmq_handles)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str, backend: str | None = None) -> None:
        self._finish_in_flight()
        backend = backend or ("nccl" if self.config.device.type == "cuda" else "gloo")
        self.executor.init_weights_update_group(master_address, master_port, rank_offset, world_size,
                                                group_name, backend)

    def update_weights_from_distributed(self, specs: list[TensorSpec], group_name: str,
                                        bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> int:
        return self._update_weights(self.executor.update_weights_from_distributed, specs, group_name, bucket_bytes)

    def destroy_weights_update_group(self, group_name: str) -> None:
        self._finish_in_flight()
        self.executor.destroy_weights_update_group(group_name)

    def collective_rpc(self, method: str, args: tuple | list = (), kwargs: dict | None = None) -> list[Any]:
        """An extension method on every rank; it may change the weights, so the prefix cache is
        dropped after it."""
        self._finish_in_flight()
        try:
            return self.executor.collective_rpc(method, args, kwargs)
        finally:
            self.kv_manager.reset_prefix_cache()

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        """Release the KV pool and graphs, stop any worker ranks (the engine cannot step afterwards)."""
        self.executor.shutdown()
