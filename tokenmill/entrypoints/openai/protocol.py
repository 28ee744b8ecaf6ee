"""OpenAI request models (pydantic) and their translation into `SamplingParams`.

Field names follow the OpenAI API plus vLLM's extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `ignore_eos`, `stop_token_ids`, ...). Unknown fields are ignored, as OpenAI's SDKs add
new ones over time. Types are strict, as OpenAI's are: `"10"` is not an integer and `0` is not a
boolean. Every integer is range-checked (at most 64 bits, as the engine core's messages carry) and
everything that can be checked without the tokenizer is checked here, so a bad request is a 400
before anything is tokenized or allocated. These models are also the server's OpenAPI schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.engine.input_processor import RESERVED_TEMPLATE_KWARGS
from tokenmill.sampling_params import (
    INT64_MAX, INT64_MIN, MAX_LOGPROBS, MAX_N, RequestOutputKind, SamplingParams, StructuredOutputsParams,
)

MAX_PROMPTS_PER_REQUEST = 64
MAX_MESSAGES = 4096
MAX_STOP_SEQUENCES = 16
MAX_STOP_TOKEN_IDS = 1024
MAX_TOOLS = 128
# n * max_tokens: one request may not ask for more tokens than this in total.
MAX_TOTAL_COMPLETION_TOKENS = 1 << 20
# A request's own deadline (`timeout`, seconds) may not be longer than a day.
MAX_TIMEOUT_S = 86400.0

Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]
PositiveInt64 = Annotated[int, Field(ge=1, le=INT64_MAX)]
TokenId = Annotated[int, Field(ge=0, le=INT64_MAX)]  # the vocabulary is checked against the model
NonEmptyStr = Annotated[str, Field(min_length=1)]
Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S,
                                 description="seconds: past this the request is aborted (408)")]


def check_template_kwargs(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """`chat_template_kwargs` are variables for the model's template: never a template of their
    own, nor the arguments the server sets."""
    if value is not None:
        if "chat_template" in value:
            raise ValueError("request-supplied chat templates are not allowed on this server")
        reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(value))
        if reserved:
            raise ValueError(f"these chat_template_kwargs are set by the server, not the request: "
                             f"{reserved[:5]}")
    return value


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None  # an assistant turn
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
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
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


class JsonSchemaFormat(StrictModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(StrictModel):
    """vLLM's `structured_outputs`: exactly one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True)

    json_: Union[dict[str, Any], str, None] = Field(default=None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None

    def to_params(self) -> StructuredOutputsParams:
        """Raises `ValueError` unless exactly one constraint is set."""
        return StructuredOutputsParams(json=self.json_, json_object=bool(self.json_object), regex=self.regex,
                                       choice=self.choice, grammar=self.grammar)


class FunctionDefinition(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(StrictModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition

    def to_template(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class NamedFunction(StrictModel):
    name: str


class NamedToolChoice(StrictModel):
    type: Literal["function"]
    function: NamedFunction


class _SamplingFields(StrictModel):
    """Fields shared by chat and completions."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    max_tokens: PositiveInt64 | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: Union[NonEmptyStr, Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)], None] = None
    seed: Int64 | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    # Keys are token ids written as decimal ASCII digits (OpenAI's form); the vocabulary is checked
    # against the model once it is known.
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,18}$")],
                     Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    timeout: Timeout | None = None
    # vLLM extras
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] = 0
    ignore_eos: bool = False
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = None
    priority: Int64 = 0
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="after")
    def _check_common(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
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
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            if schema is None:
                raise ValueError("response_format.json_schema.schema must be a JSON schema object")
            constraints.append(StructuredOutputsParams(json=schema))
        if self.structured_outputs is not None:
            constraints.append(self.structured_outputs.to_params())
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
    max_completion_tokens: PositiveInt64 | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Always refused (docs/reliability.md item 16): a template is code run on the server.
    chat_template: None = Field(default=None, description="not allowed: the model's own template is used")
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: bool = True
    # Reasoning models (`--reasoning-parser`): passed to the chat template as `reasoning_effort`
    # (templates that read it, such as gpt-oss's, honour it; the others have no such switch).
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    # vLLM's extras: leave the thinking out of the response; end the thinking after this many
    # tokens (the engine then forces the end marker).
    include_reasoning: bool = True
    thinking_token_budget: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None

    @field_validator("chat_template", mode="before")
    @classmethod
    def _refuse_template(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("request-supplied chat templates are not allowed on this server")
        return None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _refuse_reserved_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_template_kwargs(value)

    @model_validator(mode="after")
    def _check_chat(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def template_tools(self) -> list[dict[str, Any]] | None:
        """The tools as the chat template (and the tool grammars) read them."""
        return [t.to_template() for t in self.tools] if self.tools else None

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else choice


Prompt = Union[
    str,
    Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
    Annotated[list[TokenId], Field(min_length=1)],
    Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
              Field(min_length=1, max_length=MAX_PROMPTS_PER_REQUEST)],
]


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: None = Field(default=None, description="not supported")
    # 0 with `echo`: score the prompt without generating (lm-eval's loglikelihood call).
    max_tokens: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None

    @model_validator(mode="after")
    def _zero_tokens_only_to_echo(self) -> "CompletionRequest":
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens may be 0 only with echo (to score the prompt)")
        return self

    @property
    def echo_only(self) -> bool:
        """The prompt comes back (with its logprobs) and nothing is generated."""
        return self.echo and self.max_tokens == 0

    def _max_tokens(self) -> int | None:
        # The engine always samples one token; an echo-only response leaves it out.
        return 1 if self.max_tokens == 0 else self.max_tokens

    @field_validator("suffix", mode="before")
    @classmethod
    def _refuse_suffix(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("suffix is not supported")
        return None

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class TokenizeRequest(StrictModel):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[TokenId]
