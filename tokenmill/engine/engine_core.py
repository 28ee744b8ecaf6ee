"""The engine core: the step loop that schedules, runs the model and reports new tokens.

It knows nothing about text or HTTP. The offline `LLM` runs it in-process; the server runs it in
its own process behind ZMQ (`engine/core_process.py`).

With async scheduling (the default on CUDA) a step schedules and launches step N+1, then reads
step N's sampled tokens and updates the scheduler with them: the host's bookkeeping for N overlaps
the GPU's work on N+1, instead of the GPU idling while the host catches up. While a request whose
sampling reads its previous tokens (penalties, a grammar) is live, steps run one at a time.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, NamedTuple

from tokenmill.config.engine_config import EngineConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.messages import EngineOutput, EngineOutputs, EngineRequest, SchedulerStats
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.scheduler_output import SchedulerOutput
from tokenmill.core.state_cache import StateCache
from tokenmill.executor import make_executor
from tokenmill.utils.process import freeze_long_lived_objects

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
        return self.scheduler.has_unfinished_requests() or self._in_flight is not None

    def step(self) -> EngineOutputs:
        counts = SchedulerStats()  # token counts of the steps whose tokens this call reads
        outputs: list[EngineOutput] = []
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

    def get_stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        """Release the KV pool and graphs, stop any worker ranks (the engine cannot step afterwards)."""
        self.executor.shutdown()
