"""Typed messages between the front end (API process or `LLM`) and the `EngineCore`.

These are `msgspec.Struct`s: in-process they are plain objects, across the ZMQ socket they are
msgpack (`msgspec.msgpack.Encoder/Decoder(type=...)`), never pickle. Token text is not in here:
detokenization happens in the front end so the engine loop only schedules and computes.
"""

from __future__ import annotations

from enum import IntEnum

import msgspec

from tokenmill.pooling_params import PoolingParams
from tokenmill.sampling_params import SamplingParams


class FinishReason(IntEnum):
    """Why a request stopped. `str()` gives the OpenAI spelling."""

    STOP = 0  # EOS, a stop token id, or a stop string
    LENGTH = 1  # max_tokens or max_model_len reached
    ABORT = 2  # aborted by the client, a disconnect or shutdown
    ERROR = 3  # the engine failed while serving it

    def __str__(self) -> str:
        return ("stop", "length", "abort", "error")[self.value]


class EngineRequest(msgspec.Struct, omit_defaults=True, gc=False):
    """A tokenized request handed to the engine core. One per sample: `n > 1` is fanned out into
    child requests by the front end (their ids are `f"{i}_{parent_id}"`)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    eos_token_id: int | None = None
    priority: int = 0
    cache_salt: str | None = None
    # An embedding request: its prompt is pooled into one vector (EngineOutput.pooled), nothing sampled.
    pooling_params: PoolingParams | None = None


class TokenLogprobs(msgspec.Struct, array_like=True, gc=False):
    """Log-probabilities at one position: the chosen token first, then the top-k.

    `token_ids[0]` is the sampled (or, for prompt logprobs, the actual next) token and
    `ranks[0]` its rank in the full distribution (1 = most likely); the rest are the top-k in order.
    """

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


class EngineOutput(msgspec.Struct, omit_defaults=True, gc=False):
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    # Filled once, on the step that finishes the prompt (one entry per prompt token after the first).
    prompt_logprobs: list[TokenLogprobs] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    pooled: list[float] | None = None  # an embedding request's vector (float32)


class SchedulerStats(msgspec.Struct, omit_defaults=True, gc=False):
    """A snapshot for metrics and the periodic log."""

    num_running_reqs: int = 0
    num_waiting_reqs: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks in use, 0..1
    num_preemptions: int = 0  # cumulative
    prefix_cache_queries: int = 0  # cumulative, in tokens
    prefix_cache_hits: int = 0  # cumulative, in tokens
    num_prompt_tokens: int = 0  # computed this step
    num_generation_tokens: int = 0  # sampled this step


class EngineOutputs(msgspec.Struct, omit_defaults=True, gc=False):
    """All of one engine step's outputs, plus the scheduler's state after it."""

    outputs: list[EngineOutput]
    scheduler_stats: SchedulerStats | None = None
    timestamp: float = 0.0
