"""Anthropic Messages API request models (pydantic) and their translation to a prompt and
`SamplingParams`. Text, tool and thinking content blocks are served; other block types are a 400.
Types are strict and integers range-checked, as on the OpenAI routes (`openai/protocol.py`).

Fields that change the output are honoured or refused, never ignored: `output_config.format`
(what `messages.parse` sends) constrains the answer to its JSON schema; `thinking` turns a
reasoning model's thinking on or off in its chat template and returns it as thinking blocks, with
`budget_tokens` as the engine's thinking budget (a server without `--reasoning-parser` refuses
it); `output_config.effort` has no equivalent here and is refused."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from tokenmill.entrypoints.openai.protocol import (
    MAX_MESSAGES, MAX_STOP_SEQUENCES, MAX_TOOLS, NonEmptyStr, PositiveInt64, StrictModel, Timeout,
)
from tokenmill.sampling_params import INT64_MAX, RequestOutputKind, SamplingParams, StructuredOutputsParams


class TextBlock(StrictModel):
    type: Literal["text"]
    text: str


class ToolUseBlock(StrictModel):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(StrictModel):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Union[str, list[TextBlock], None] = None
    is_error: bool = False

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlock(StrictModel):
    """A thinking block sent back in an assistant turn: its text goes to the template as the
    turn's `reasoning_content` (templates that keep past thinking show it to the model)."""

    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(StrictModel):
    type: Literal["redacted_thinking"]
    data: str


ContentBlock = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock],
                         Field(discriminator="type")]


class Message(StrictModel):
    role: Literal["user", "assistant"]
    content: Union[str, list[ContentBlock]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if isinstance(b, TextBlock))

    def to_template(self) -> list[dict[str, Any]]:
        """OpenAI-style dicts for the chat template: tool_use blocks become the assistant's
        `tool_calls`, each tool_result block a `tool` message."""
        if isinstance(self.content, str):
            return [{"role": self.role, "content": self.content}]
        out: list[dict[str, Any]] = []
        for block in self.content:
            if isinstance(block, ToolResultBlock):
                out.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": block.text()})
        calls = [{"id": b.id, "type": "function", "function": {"name": b.name, "arguments": json.dumps(b.input)}}
                 for b in self.content if isinstance(b, ToolUseBlock)]
        text = self.text()
        thinking = "".join(b.thinking for b in self.content if isinstance(b, ThinkingBlock))
        if text or calls or thinking or not out:
            message: dict[str, Any] = {"role": self.role, "content": text}
            if calls:
                message["tool_calls"] = calls
            if thinking and self.role == "assistant":
                message["reasoning_content"] = thinking
            out.append(message)
        return out


class Tool(StrictModel):
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    input_schema: dict[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description or "",
                                                 "parameters": self.input_schema}}


class Metadata(StrictModel):
    user_id: str | None = None


class ToolChoice(StrictModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # the tool, for type "tool"
    disable_parallel_tool_use: bool = False

    @model_validator(mode="after")
    def _name_for_tool(self) -> "ToolChoice":
        if self.type == "tool" and self.name is None:
            raise ValueError('tool_choice of type "tool" needs the tool\'s name')
        return self


class ThinkingConfig(StrictModel):
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    # Anthropic asks for at least 1,024; any positive budget below max_tokens is served here.
    budget_tokens: PositiveInt64 | None = None
    display: Literal["summarized", "omitted"] | None = None

    @property
    def enabled(self) -> bool:
        return self.type in ("enabled", "adaptive")


class JsonOutputFormat(StrictModel):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(StrictModel):
    format: JsonOutputFormat | None = None
    effort: str | None = None


class _Conversation(StrictModel):
    model: str
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    system: Union[str, list[TextBlock], None] = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None

    def chat_messages(self) -> list[dict]:
        """OpenAI-style role/content dicts for the model's chat template."""
        out = []
        if self.system:
            system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system)
            out.append({"role": "system", "content": system})
        for m in self.messages:
            out.extend(m.to_template())
        return out

    def template_tools(self) -> list[dict] | None:
        if not self.tools or (self.tool_choice is not None and self.tool_choice.type == "none"):
            return None
        return [t.to_openai() for t in self.tools]


class MessagesRequest(_Conversation):
    max_tokens: PositiveInt64  # required by the Anthropic API
    stop_sequences: Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    metadata: Metadata | None = None
    stream: bool = False
    timeout: Timeout | None = None  # tokenmill's extra, as on the OpenAI routes
    # vLLM's extra, as on the OpenAI routes: requests with different salts never share cached
    # prefix blocks, so one tenant cannot time another's prompts.
    cache_salt: str | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    output_format: JsonOutputFormat | None = None  # the structured-outputs beta's spelling

    @model_validator(mode="after")
    def _check_messages(self) -> "MessagesRequest":
        if self.output_config is not None and self.output_config.effort is not None:
            raise ValueError("output_config.effort is not supported by this server")
        if self.thinking is not None and self.thinking.type == "between_tools":
            raise ValueError('thinking type "between_tools" is not supported; use "enabled", '
                             '"adaptive" or "disabled"')
        budget = self.thinking.budget_tokens if self.thinking is not None else None
        if budget is not None and budget >= self.max_tokens:
            raise ValueError("thinking.budget_tokens must be less than max_tokens")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        fmt = self.output_config.format if self.output_config is not None else None
        fmt = fmt or self.output_format
        return fmt.schema_ if fmt is not None else None

    def template_kwargs(self) -> dict[str, Any] | None:
        """The chat template's thinking switches: Qwen3 reads `enable_thinking`, DeepSeek-V3.1
        and Kimi-K2 read `thinking`."""
        if self.thinking is None:
            return None
        return {"enable_thinking": self.thinking.enabled, "thinking": self.thinking.enabled}

    def to_sampling_params(self) -> SamplingParams:
        """Raises `ValueError` with a user-facing message for out-of-range values."""
        schema = self.output_schema()
        return SamplingParams(
            structured_outputs=StructuredOutputsParams(json=schema) if schema is not None else None,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            stop=self.stop_sequences or None,
            max_tokens=self.max_tokens,
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )


class CountTokensRequest(_Conversation):
    pass
