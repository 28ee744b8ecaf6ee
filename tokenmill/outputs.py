"""What `LLM.generate` / `LLM.chat` return (vLLM's names, so users switch without relearning).

`msgspec.Struct`s rather than dataclasses: a streaming server builds one `RequestOutput` and one
`CompletionOutput` per request per step, and a `Logprob` per reported token, and a Struct is
built ~5x faster.
"""

from __future__ import annotations

import msgspec


class Logprob(msgspec.Struct, gc=False):
    """One token's log-probability, its rank (1 = most likely) and its text."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One dict per position: token id -> Logprob (the chosen token and the top-k).
PositionLogprobs = dict[int, Logprob]


class CompletionOutput(msgspec.Struct):
    """One sample of a request."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestOutput(msgspec.Struct):
    """All samples of one prompt."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: dict[str, float] = msgspec.field(default_factory=dict)
