"""OpenAI request models (pydantic) and their translation into `SamplingParams`.

Field names follow the OpenAI API plus vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, ...). Unknown fields are ignored, as OpenAI's SDKs add
new ones over time. Everything that can be checked without the tokenizer is checked here, so a bad
request is a 400 before anything is tokenized or allocated.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokenmill.sampling_params import (
    MAX_LOGPROBS, RequestOutputKind, SamplingParams, StructuredOutputsParams,
)

MAX_PROMPTS_PER_REQUEST = 64
MAX_MESSAGES = 4096
MAX_STOP_SEQUENCES = 16
MAX_TOOLS = 128
# n * max_tokens: one request may not ask for more tokens than this in total.
MAX_TOTAL_COMPLETION_TOKENS = 1 << 20


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(_Model):
    type: Literal["text"]
    text: str


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: which call this answers

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def to_template(self) -> dict[str, Any]:
        """The dict a chat template reads (text content, plus tool fields when present)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Model):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None  # {"name": ..., "schema": {...}, "strict": ...}


class _SamplingFields(_Model):
    """Fields shared by chat and completions."""

    model: str | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = None
    priority: int = 0
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's: json / json_object / regex / choice / grammar

    @model_validator(mode="after")
    def _check_common(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if self.logit_bias is not None:
            bad = [k for k in self.logit_bias if not k.lstrip("-").isdigit()]
            if bad:
                raise ValueError(f"logit_bias keys must be token ids (integers); bad keys: {bad[:10]}")
            bad = [k for k, v in self.logit_bias.items() if not math.isfinite(v) or not -100 <= v <= 100]
            if bad:
                raise ValueError(f"logit_bias values must be numbers in [-100, 100]; bad keys: {bad[:10]}")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_tokens

    def structured_output_params(self) -> StructuredOutputsParams | None:
        """The output constraint asked for, if any. Raises `ValueError` for a malformed one (the
        schema / regex / grammar itself is compiled, and so checked, by the input processor)."""
        constraints = []
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            constraints.append(StructuredOutputsParams(json_object=True))
        elif fmt is not None and fmt.type == "json_schema":
            schema = (fmt.json_schema or {}).get("schema")
            if not isinstance(schema, dict):
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            constraints.append(StructuredOutputsParams(json=schema))
        if self.structured_outputs is not None:
            fields = {"json", "json_object", "regex", "choice", "grammar"}
            unknown = sorted(set(self.structured_outputs) - fields)
            if unknown:
                raise ValueError(f"structured_outputs has unknown fields {unknown[:5]}; use {sorted(fields)}")
            try:
                constraints.append(StructuredOutputsParams(**self.structured_outputs))
            except TypeError:
                raise ValueError("structured_outputs has a field of the wrong type") from None
        if len(constraints) > 1:
            raise ValueError("give one of response_format and structured_outputs, not both")
        return constraints[0] if constraints else None

    def to_sampling_params(self, *, default_max_tokens: int | None, logprobs: int | None,
                           prompt_logprobs: int | None = None,
                           defaults: dict[str, Any] | None = None) -> SamplingParams:
        """Raises `ValueError` with a user-facing message for out-of-range values. `defaults`: the
        model's sampling defaults (`--generation-config`) for the fields the request leaves unset."""
        d = defaults or {}
        max_tokens = self._max_tokens()
        if max_tokens is None:
            max_tokens = d.get("max_tokens", default_max_tokens)
        if max_tokens is not None and self.n * max_tokens > MAX_TOTAL_COMPLETION_TOKENS:
            raise ValueError(f"n * max_tokens must be at most {MAX_TOTAL_COMPLETION_TOKENS}")
        return SamplingParams(
            n=self.n,
            temperature=d.get("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=d.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=d.get("top_k", 0) if self.top_k is None else self.top_k,
            min_p=d.get("min_p", 0.0) if self.min_p is None else self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=d.get("repetition_penalty", 1.0) if self.repetition_penalty is None else self.repetition_penalty,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            skip_special_tokens=self.skip_special_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
            structured_outputs=self.structured_output_params(),
        )


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # refused unless the operator allows it (RELIABILITY.md 16)
    tools: Annotated[list[dict[str, Any]], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= MAX_LOGPROBS:
                raise ValueError(f"top_logprobs must be in [0, {MAX_LOGPROBS}]")
            if not self.logprobs:
                raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


Prompt = Union[
    Annotated[str, Field()],
    Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
    Annotated[list[int], Field(min_length=1)],
    Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check_completion(self) -> "CompletionRequest":
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}]")
        if self.suffix is not None:
            raise ValueError("suffix is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TokenizeRequest(_Model):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Model):
    model: str | None = None
    tokens: list[int]
