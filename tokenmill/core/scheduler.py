"""Continuous batching with one rule: every step, move each request's `num_computed_tokens`
toward its total token count, within a token budget and a sequence cap.

There is no prefill phase and no decode phase. Running requests go first (a decode costs one
token; a partly prefilled prompt continues its chunk), then waiting ones, chunking long prompts.
When the block pool runs dry, the newest running request (or, under the `priority` policy, the
lowest-priority one) is preempted: its blocks are freed and it is recomputed later.

`num_computed_tokens` advances when a step is scheduled, not when it returns, so that under async
scheduling step N+1 can be scheduled while step N runs. A step that reaches the end of a request's
tokens samples one more, counted in `num_inflight_tokens` until `update` appends it; step N+1's
input for that request is then step N's token, which the runner takes from the device.
Plain Python, no torch: unit-testable in milliseconds.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import Iterable

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler_output import (
    CachedRequestData,
    ModelRunnerOutput,
    NewRequestData,
    SchedulerOutput,
)
from tokenmill.core.messages import EngineOutput, SchedulerStats

_RUNNING = RequestStatus.RUNNING
_PREEMPTED = RequestStatus.PREEMPTED
_FINISHED = RequestStatus.FINISHED_STOPPED  # status >= this: finished


class WaitingQueue:
    """FCFS deque, or a heap on (priority, arrival) for the `priority` policy."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def _key(self, req: Request) -> tuple[int, float, int, Request]:
        return (req.priority, req.arrival_time, next(self._counter), req)

    def add(self, req: Request) -> None:
        if self.policy == "priority":
            heapq.heappush(self._heap, self._key(req))
        else:
            self._fifo.append(req)

    def add_front(self, req: Request) -> None:
        """A preempted request goes back ahead of later arrivals."""
        if self.policy == "priority":
            heapq.heappush(self._heap, self._key(req))
        else:
            self._fifo.appendleft(req)

    def peek(self) -> Request:
        return self._heap[0][3] if self.policy == "priority" else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.policy == "priority" else self._fifo.popleft()

    def remove(self, req: Request) -> None:
        if self.policy == "priority":
            self._heap = [e for e in self._heap if e[3] is not req]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(req)

    def __len__(self) -> int:
        return len(self._heap) if self.policy == "priority" else len(self._fifo)

    def __iter__(self):
        return iter([e[3] for e in self._heap] if self.policy == "priority" else list(self._fifo))


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_manager: KVCacheManager) -> None:
        self.config = config
        self.kv = kv_manager
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(config.scheduling_policy)
        self.running: list[Request] = []
        self._finished_since_last_step: set[str] = set()
        self._preempted_since_last_step: set[str] = set()  # by `preempt_all`, between steps
        self.num_preemptions = 0
        self._num_needing_host_tokens = 0  # live requests whose sampling reads earlier tokens

    @property
    def needs_synchronous_steps(self) -> bool:
        """Whether a live request's next step must wait for its previous token on the host."""
        return self._num_needing_host_tokens > 0

    # ----- request lifecycle -----
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self._num_needing_host_tokens += request.needs_host_tokens
        self.waiting.add(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Abort (or otherwise end) requests wherever they are; their blocks are freed at once."""
        finished = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.is_finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free(request)
            finished.append(request)
        return finished

    def _free(self, request: Request) -> None:
        self.kv.free(request)
        self._finished_since_last_step.add(request.request_id)
        self._num_needing_host_tokens -= request.needs_host_tokens
        del self.requests[request.request_id]

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.waiting) > 0

    # ----- one step -----
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        max_len = self.config.max_model_len
        out = SchedulerOutput(finished_request_ids=self._finished_since_last_step,
                              preempted_request_ids=self._preempted_since_last_step)
        self._finished_since_last_step = set()
        self._preempted_since_last_step = set()
        preempted_this_step = False
        self.kv.begin_step()

        # 1. Running requests, oldest first. (Hot at large batch: locals instead of attribute chains.)
        kv = self.kv
        running = self.running  # _preempt removes from this same list
        cached_requests = out.cached_requests
        num_scheduled = out.num_scheduled_tokens
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            num_computed = request.num_computed_tokens
            num_known = len(request.all_token_ids) + request.num_inflight_tokens
            if request.num_inflight_tokens and (num_known >= request.max_num_tokens or num_known >= max_len):
                i += 1  # its in-flight token ends it (length): nothing more to compute
                continue
            num_new = min(num_known - num_computed, budget, max_len - num_computed)
            if num_new > 1:
                # A prompt being prefilled leaves a token for each running request after it, and
                # half the budget to requests waiting for a slot: one long prompt must not stall
                # the others until it is done.
                num_new = min(num_new, max(1, budget - (len(running) - i - 1)))
                if len(self.waiting) and len(running) < self.config.max_num_seqs:
                    num_new = min(num_new, max(1, self.config.max_num_batched_tokens // 2))
            if num_new <= 0:
                i += 1
                continue
            preempted_here = False
            while True:
                new_block_ids = kv.allocate_slots(request, num_new)
                if new_block_ids is not None:
                    break
                victim = self._pick_victim()
                self._preempt(victim, out)
                cached_requests = out.cached_requests  # _preempt rebuilt it
                preempted_this_step = preempted_here = True
                if victim is request:
                    break
            if request.status != _RUNNING:
                continue  # preempted itself; self.running shrank, don't advance i
            request_id = request.request_id
            cached_requests.append(CachedRequestData(request_id, new_block_ids, num_computed))
            num_scheduled[request_id] = num_new
            request.num_computed_tokens = num_computed + num_new
            if num_computed + num_new == num_known:
                request.num_inflight_tokens += 1  # this step samples
            # Only known tokens: a block holding an in-flight token is published by `update`.
            kv.cache_full_blocks(request, min(num_computed + num_new, len(request.all_token_ids)))
            if kv.states is not None:
                self._checkpoint_states(request, num_computed, num_computed + num_new, out)
            budget -= num_new
            # A priority-policy victim may sit before this request: find our place again.
            i = running.index(request) + 1 if preempted_here else i + 1

        # 2. Waiting requests, while there is budget, a sequence slot and no memory pressure.
        while (len(self.waiting) and budget > 0 and not preempted_this_step
               and len(self.running) < self.config.max_num_seqs):
            request = self.waiting.peek()
            computed_blocks, num_hit = [], 0
            if request.num_computed_tokens == 0:
                computed_blocks, num_hit = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_hit, budget)
            if num_new < request.num_tokens - num_hit and not self.config.chunked_prefill:
                break  # a whole prompt or nothing (encoders): it waits for the next step's budget
            new_block_ids = self.kv.allocate_slots(request, num_new, computed_blocks)
            if new_block_ids is None:
                break  # the pool is full: wait for running requests to finish
            self.waiting.pop()
            # Its previous step's token (if it was preempted with one in flight) arrived in the
            # `update` between its preemption and now: a waiting request knows all its tokens.
            assert request.num_inflight_tokens == 0
            request.num_computed_tokens = num_hit + num_new
            if num_hit + num_new == request.num_tokens:
                request.num_inflight_tokens = 1
            self.kv.cache_full_blocks(request, num_hit + num_new)
            if self.kv.states is not None:
                self._checkpoint_states(request, num_hit, num_hit + num_new, out)
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.new_requests.append(NewRequestData(
                request_id=request.request_id, token_ids=list(request.all_token_ids),
                num_prompt_tokens=request.num_prompt_tokens, sampling_params=request.sampling_params,
                block_ids=self.kv.block_ids(request.request_id), num_computed_tokens=num_hit,
                num_output_tokens=request.num_output_tokens, eos_token_id=request.eos_token_id,
                pooling_params=request.pooling_params,
                state_slot=self.kv.state_slot(request.request_id),
                restore_state_from=self.kv.take_state_restore(request.request_id)))
            out.num_scheduled_tokens[request.request_id] = num_new
            budget -= num_new

        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        assert out.total_num_scheduled_tokens <= self.config.max_num_batched_tokens
        assert len(self.running) <= self.config.max_num_seqs
        return out

    def preempt_all(self) -> None:
        """Between steps (no token in flight): send every running request back to the waiting
        queue, oldest first, its blocks freed; each is recomputed from its tokens when scheduled
        again (the KV cache is about to be dropped). The runner hears of it with the next step."""
        out = SchedulerOutput()
        for request in reversed(list(self.running)):
            assert request.num_inflight_tokens == 0, "preempt_all with a step in flight"
            self._preempt(request, out)
        self._preempted_since_last_step |= out.preempted_request_ids

    def _checkpoint_states(self, request: Request, start: int, end: int, out: SchedulerOutput) -> None:
        """Hybrid models: the state checkpoints the step computing tokens [start, end) stores."""
        slots = self.kv.checkpoint_states(request, start, end)
        if slots:
            out.state_checkpoints[request.request_id] = slots

    def _pick_victim(self) -> Request:
        if self.config.scheduling_policy == "priority":
            # Lowest priority (largest value), newest among equals.
            return max(self.running, key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.running.remove(request)
        num_scheduled = out.num_scheduled_tokens.pop(request.request_id, 0)
        if num_scheduled:  # scheduled earlier in this step, which now will not run for it
            if request.num_computed_tokens == request.num_tokens + request.num_inflight_tokens - 1:
                request.num_inflight_tokens -= 1  # that step would have sampled
            request.num_computed_tokens -= num_scheduled
        self.kv.free(request)  # (unpublishes the blocks that step would have filled)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.prompt_logprobs.clear()  # recomputed with the prompt
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add_front(request)
        out.preempted_request_ids.add(request.request_id)
        out.cached_requests = [c for c in out.cached_requests if c.request_id != request.request_id]
        out.state_checkpoints.pop(request.request_id, None)

    # ----- after the model ran -----
    def update(self, sched: SchedulerOutput, result: ModelRunnerOutput) -> list[EngineOutput]:
        outputs: list[EngineOutput] = []
        requests = self.requests
        sampled = result.sampled_token_ids
        all_prompt_lps = result.prompt_logprobs
        all_lps = result.logprobs
        pooled = result.pooled
        max_len = self.config.max_model_len
        block_size = self.kv.block_size
        any_finished = False
        for request_id in sched.num_scheduled_tokens:
            request = requests.get(request_id)
            if request is None:
                continue  # aborted while the step ran
            running = request.status == _RUNNING
            if not running and request.status != _PREEMPTED:
                continue
            # (A request preempted after this step was launched keeps the step's token: async
            # scheduling preempts while a step runs. Its prompt logprobs are recomputed.)
            if all_prompt_lps and running:
                prompt_lps = all_prompt_lps.get(request_id)
                if prompt_lps:
                    request.prompt_logprobs.extend(prompt_lps)
            if pooled and request_id in pooled:  # an embedding request: done with its prompt
                request.status = RequestStatus.FINISHED_STOPPED
                outputs.append(EngineOutput(request_id, [], finish_reason=request.status.finish_reason,
                                            pooled=pooled[request_id]))
                self._free(request)
                any_finished = True
                continue
            token = sampled.get(request_id)
            if token is None:
                continue  # a prompt chunk that did not reach the end
            request.num_inflight_tokens -= 1
            token_ids = request.all_token_ids
            token_ids.append(token)
            num_tokens_now = len(token_ids)
            if running and num_tokens_now % block_size == 0 and request.num_computed_tokens >= num_tokens_now:
                # Async: this token filled a block whose K/V the next step (already launched) completes.
                self.kv.cache_full_blocks(request, num_tokens_now)
            # Only a possible stop token or a length limit can end it: skip the full check otherwise.
            if (token in request.stop_check_token_ids or num_tokens_now >= request.max_num_tokens
                    or num_tokens_now >= max_len):
                self._check_stop(request, token)
            out = EngineOutput(request_id, [token], num_cached_tokens=max(request.num_cached_tokens, 0))
            if all_lps:
                lp = all_lps.get(request_id)
                if lp is not None:
                    out.new_logprobs = [lp]
            if request.wants_prompt_logprobs and num_tokens_now - request.num_prompt_tokens == 1:
                out.prompt_logprobs = request.prompt_logprobs
            if request.status >= _FINISHED:
                out.finish_reason = request.status.finish_reason
                out.stop_reason = request.stop_reason
                if not running:
                    self.waiting.remove(request)
                self._free(request)
                any_finished = True
            outputs.append(out)
        if any_finished:
            # One pass instead of a list.remove per finished request (O(n^2) when a batch ends).
            self.running[:] = [r for r in self.running if r.status == _RUNNING]
        return outputs

    def _check_stop(self, request: Request, token: int) -> None:
        params = request.sampling_params
        num_out = request.num_output_tokens
        if num_out >= params.min_tokens:
            if token == request.eos_token_id and not params.ignore_eos:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            stop_ids = params.all_stop_token_ids or params.stop_token_ids
            if stop_ids and token in stop_ids:
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = token
                return
        if (params.max_tokens is not None and num_out >= params.max_tokens) or \
                request.num_tokens >= self.config.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running_reqs=len(self.running), num_waiting_reqs=len(self.waiting),
            kv_cache_usage=self.kv.usage, num_preemptions=self.num_preemptions,
            prefix_cache_queries=self.kv.prefix_queries, prefix_cache_hits=self.kv.prefix_hits)
