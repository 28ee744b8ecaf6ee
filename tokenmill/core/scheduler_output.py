"""What the scheduler hands the model runner each step. Only diffs cross: the runner keeps its own
persistent per-request state and applies these."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """A request the runner has not seen (or is resuming after preemption: it starts over)."""

    request_id: str
    token_ids: list[int]  # prompt, plus outputs so far when resuming
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int  # > 0 on a prefix-cache hit
    num_output_tokens: int = 0  # outputs already produced (resuming)
    eos_token_id: int | None = None
    pooling_params: PoolingParams | None = None  # an embedding request: pooled, not sampled
    # Hybrid models: the request's state slot, and the checkpoint slot its state starts from
    # (a prefix-cache hit; -1: none, it starts from zero).
    state_slot: int = -1
    restore_state_from: int = -1


@dataclass(slots=True)
class CachedRequestData:
    """A running request the runner already holds: its new blocks and progress."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    finished_request_ids: set[str] = field(default_factory=set)  # finished since the last step
    preempted_request_ids: set[str] = field(default_factory=set)
    # Hybrid models with prefix caching: request id -> the slots to store its state into at each
    # checkpoint boundary its chunk crosses (core/state_cache.py; -1: none).
    state_checkpoints: dict[str, list[int]] = field(default_factory=dict)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(slots=True)
class ModelRunnerOutput:
    """Sampled tokens for the requests that reached the end of their known tokens this step."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, object] = field(default_factory=dict)  # request id -> TokenLogprobs
    prompt_logprobs: dict[str, list] = field(default_factory=dict)  # request id -> [TokenLogprobs]
    pooled: dict[str, list[float]] = field(default_factory=dict)  # embedding requests: their vectors
