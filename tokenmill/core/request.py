"""The engine core's view of one request (one sample): tokens, progress, status and cache hashes."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from enum import IntEnum

from tokenmill.core.messages import EngineRequest, FinishReason, TokenLogprobs
from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams


class RequestStatus(IntEnum):
    """Ordered so that "finished" is one comparison: `status >= FINISHED_STOPPED`."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_id: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    status: RequestStatus = RequestStatus.WAITING
    all_token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = -1  # prompt tokens served by the prefix cache (set at first schedule)
    # Tokens a scheduled step will sample that have not reached the host yet (async scheduling:
    # step N+1 is scheduled before step N's token is known; 0 or 1, briefly 2, inside `schedule`).
    num_inflight_tokens: int = 0
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # one per full block of all_token_ids
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # accumulated across chunks
    pooling_params: PoolingParams | None = None  # an embedding request (pooled once, nothing sampled)
    # Derived once from the parameters, for the scheduler's per-token checks.
    num_prompt_tokens: int = field(init=False)
    wants_prompt_logprobs: bool = field(init=False)
    # Sampled tokens that may stop the request (EOS unless ignored, stop ids); others cannot.
    stop_check_token_ids: frozenset[int] = field(init=False)
    # The token count at which max_tokens is reached (no limit: a count never reached).
    max_num_tokens: int = field(init=False)
    # Its next step's sampling reads its previous tokens on the host (penalties, a grammar, a
    # thinking budget), so it cannot be scheduled ahead of them: the engine steps synchronously
    # while it runs.
    needs_host_tokens: bool = field(init=False)

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)
        params = self.sampling_params
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.wants_prompt_logprobs = params.prompt_logprobs is not None
        stop_ids = set(params.all_stop_token_ids or params.stop_token_ids or ())
        if self.eos_token_id is not None and not params.ignore_eos:
            stop_ids.add(self.eos_token_id)
        self.stop_check_token_ids = frozenset(stop_ids)
        self.needs_host_tokens = params.needs_penalties or params.constrains_output
        self.max_num_tokens = (self.num_prompt_tokens + params.max_tokens if params.max_tokens is not None
                               else sys.maxsize)

    @classmethod
    def from_engine_request(cls, req: EngineRequest) -> "Request":
        return cls(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                   sampling_params=req.sampling_params, arrival_time=req.arrival_time,
                   eos_token_id=req.eos_token_id, priority=req.priority, cache_salt=req.cache_salt,
                   pooling_params=req.pooling_params)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]
