"""The engine core's view of one request (one sample): tokens, progress, status and cache hashes."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from tokenmill.engine.messages import EngineRequest, FinishReason, TokenLogprobs
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
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    block_hashes: list[bytes] = field(default_factory=list)  # one per full block of all_token_ids
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # accumulated across chunks

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @classmethod
    def from_engine_request(cls, req: EngineRequest) -> "Request":
        return cls(request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
                   sampling_params=req.sampling_params, arrival_time=req.arrival_time,
                   eos_token_id=req.eos_token_id, priority=req.priority, cache_salt=req.cache_salt)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling_params.prompt_logprobs is not None

    def append_output_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
