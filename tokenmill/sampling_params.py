"""User-facing sampling parameters, validated once when they are built.

`SamplingParams` is a `msgspec.Struct` so it crosses the API-process / engine-core boundary as typed
msgpack, never pickle. Every check raises `ValueError` with a message a user can act on; nothing
invalid ever reaches the engine.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import Any

import msgspec

# Caps on fan-out (docs/reliability.md item 28): generous for real use, small enough that one
# request cannot allocate the world.
MAX_N = 128
MAX_LOGPROBS = 20
# Every integer crosses to the engine core as msgpack, which holds 64 bits: anything wider is a
# user error here, not an encoding failure after the request was registered.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def is_int(value: Any, lo: int = INT64_MIN, hi: int = INT64_MAX) -> bool:
    """A true integer (not a bool) in [lo, hi]."""
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def wrap_int64(value: int) -> int:
    """`value` folded into int64 (two's complement), e.g. a child's seed `seed + i` at the top."""
    return (value - INT64_MIN) % 2**64 + INT64_MIN


class RequestOutputKind(IntEnum):
    """How much of the output each `RequestOutput` carries while a request runs."""

    CUMULATIVE = 0  # everything so far (offline default)
    DELTA = 1  # only what is new since the last output (streaming)
    FINAL_ONLY = 2  # one output, when the request finishes


class StructuredOutputsParams(msgspec.Struct, omit_defaults=True):
    """A constraint on the output; exactly one field is set (enforced by xgrammar)."""

    json: str | dict | None = None  # a JSON schema (dict or its text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF (GBNF) grammar text

    def __post_init__(self) -> None:
        # msgspec does not check types in __init__: a wrong type here would only fail when the
        # engine core decodes the request, so every field is checked now.
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object or its text)")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured_outputs.json_object must be a boolean")
        for name in ("regex", "grammar"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a string")
        if self.choice is not None and (not isinstance(self.choice, list)
                                        or not all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a list of strings")
        count = sum(
            x is not None and x is not False
            for x in (self.json, self.regex, self.choice, self.grammar, self.json_object or None)
        )
        if count != 1:
            raise ValueError(
                "structured_outputs must set exactly one of json, json_object, regex, choice, grammar"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_outputs.choice must not be empty")


class ReasoningParams(msgspec.Struct, omit_defaults=True):
    """Where a reasoning model's thinking ends in its output, for the engine.

    `structured_outputs` constrain only what follows the thinking, so a model may think freely and
    still answer in the schema; `max_tokens` bounds the thinking, after which the end sequence is
    forced. The API server fills this in from its `--reasoning-parser` and the tokenizer.

    Args:
        end_token_ids: the token sequence that closes the thinking (e.g. `</think>`'s ids).
        start_token_id: when set, the output has not begun thinking yet and may open it with this
            token as its first; any other first token means no thinking and the constraint applies
            from there. When None, the output starts inside the thinking (the prompt opened it).
        max_tokens: most thinking tokens (the start token included); None: unbounded.
    """

    end_token_ids: list[int]
    start_token_id: int | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.end_token_ids, list) or not self.end_token_ids or \
                not all(is_int(t, 0) for t in self.end_token_ids):
            raise ValueError("reasoning.end_token_ids must be a non-empty list of token ids")
        if self.start_token_id is not None and not is_int(self.start_token_id, 0):
            raise ValueError("reasoning.start_token_id must be a token id")
        if self.max_tokens is not None and not is_int(self.max_tokens, 0):
            raise ValueError(f"the thinking budget must be an integer >= 0, got {self.max_tokens!r}")


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


class SamplingParams(msgspec.Struct, omit_defaults=True, kw_only=True):
    """How to pick each next token and when to stop (vLLM's names and meanings).

    Args:
        n: number of independent samples returned for the prompt.
        temperature: 0 means greedy; higher flattens the distribution.
        top_p: nucleus sampling, in (0, 1].
        top_k: keep the k most likely tokens; 0 or -1 disables.
        min_p: drop tokens whose probability is below min_p times the top token's, in [0, 1].
        presence_penalty / frequency_penalty: OpenAI penalties on generated tokens, in [-2, 2].
        repetition_penalty: CTRL-style penalty on prompt and generated tokens, > 0 (1 disables).
        seed: per-request seed; the same seed gives the same tokens whatever else is in the batch.
        stop: strings that end generation; never included in the text unless
            `include_stop_str_in_output`.
        stop_token_ids: token ids that end generation (kept in `token_ids`, not in text).
        ignore_eos: keep going past the end-of-sequence token.
        max_tokens: most tokens to generate (None: up to the context length).
        min_tokens: EOS and stop tokens are suppressed until this many tokens are out.
        logprobs: return this many top log-probabilities per generated token (plus the sampled one).
        prompt_logprobs: the same for every prompt token.
        logit_bias: token id -> bias added to its logit, in [-100, 100].
        skip_special_tokens: leave special tokens out of the text.
        structured_outputs: a grammar the output must follow (after the thinking, with `reasoning`).
        reasoning: where a reasoning model's thinking ends, and its budget (`ReasoningParams`).
        output_kind: cumulative, delta or final-only outputs while running.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    reasoning: ReasoningParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # Extra stop ids the engine adds from the model (e.g. <|im_end|> besides EOS); not user-set.
    all_stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = [s for s in self.stop]
            if any(not isinstance(s, str) or s == "" for s in self.stop):
                raise ValueError("stop must be a list of non-empty strings")
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        if not is_int(self.n, 1, MAX_N):
            raise ValueError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            _check_finite(name, getattr(self, name))
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not is_int(self.top_k, 0):
            raise ValueError(f"top_k must be 0 (disabled), -1 (disabled) or a positive 64-bit integer, "
                             f"got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not is_int(self.seed):
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed!r}")
        if self.max_tokens is not None and not is_int(self.max_tokens, 1):
            raise ValueError(f"max_tokens must be an integer of at least 1, got {self.max_tokens!r}")
        if not is_int(self.min_tokens, 0):
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not is_int(value, 0, MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("stop_token_ids", "all_stop_token_ids"):
            ids = getattr(self, name)
            if ids is not None and (not isinstance(ids, list) or not all(is_int(t, 0) for t in ids)):
                raise ValueError(f"{name} must be a list of non-negative 64-bit integers")
        if self.logit_bias is not None:
            bad = [k for k, v in self.logit_bias.items()
                   if not is_int(k, 0) or not isinstance(v, (int, float)) or isinstance(v, bool)
                   or not math.isfinite(v) or not -100 <= v <= 100]
            if bad:
                raise ValueError(
                    f"logit_bias has invalid entries for token ids {bad[:10]}: keys must be "
                    "non-negative token ids and values numbers in [-100, 100]"
                )
        if self.structured_outputs is not None and not isinstance(self.structured_outputs,
                                                                  StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams")
        if self.reasoning is not None and not isinstance(self.reasoning, ReasoningParams):
            raise ValueError("reasoning must be a ReasoningParams")

    # ----- derived properties (read by the sampler to pick fast paths) -----
    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1.0)

    @property
    def constrains_output(self) -> bool:
        """Each sampled token depends on the request's earlier output through a mask: a grammar,
        or a thinking budget that forces the end of the thinking."""
        return self.structured_outputs is not None or (
            self.reasoning is not None and self.reasoning.max_tokens is not None)

    def clone(self, **changes: Any) -> "SamplingParams":
        """A copy with some fields changed (used to fan `n` out into child requests)."""
        return msgspec.structs.replace(self, **changes)
