"""Request models of `POST /v1/responses` and their translation into chat messages.

The Responses API takes a conversation as a list of items: messages (text parts), the model's
earlier `function_call`s, the caller's `function_call_output`s and earlier `reasoning` items. They
become the OpenAI-style messages a chat template reads: calls join the assistant turn they belong
to, outputs become `tool` messages, reasoning becomes the next assistant turn's
`reasoning_content`. Only function tools are served; other tool types, image or file inputs, and
fields that would change the output but have no equivalent here are a 400.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from tokenmill.entrypoints.openai.protocol import (
    MAX_MESSAGES, MAX_TOOLS, FunctionDefinition, Int64, PositiveInt64, StrictModel, Timeout, check_template_kwargs,
)
from tokenmill.sampling_params import INT64_MAX, RequestOutputKind, SamplingParams, StructuredOutputsParams


class InputText(StrictModel):
    type: Literal["input_text"]
    text: str


class OutputText(StrictModel):
    type: Literal["output_text"]
    text: str


class Refusal(StrictModel):
    type: Literal["refusal"]
    refusal: str


ContentPart = Annotated[Union[InputText, OutputText, Refusal], Field(discriminator="type")]


class MessageItem(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)]]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in self.content)


class FunctionCallItem(StrictModel):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(StrictModel):
    type: Literal["function_call_output"]
    call_id: str
    output: Union[str, Annotated[list[ContentPart], Field(max_length=MAX_MESSAGES)]]
    id: str | None = None
    status: str | None = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "".join(p.refusal if isinstance(p, Refusal) else p.text for p in self.output)


class ReasoningText(StrictModel):
    type: Literal["reasoning_text"]
    text: str


class SummaryText(StrictModel):
    type: Literal["summary_text"]
    text: str


class ReasoningItem(StrictModel):
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = []
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: str | None = None

    def text(self) -> str:
        parts = self.content or self.summary
        return "".join(p.text for p in parts)


def _item_kind(value: Any) -> str:
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", "message")
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[
    Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
          Annotated[FunctionCallOutputItem, Tag("function_call_output")],
          Annotated[ReasoningItem, Tag("reasoning")]],
    Discriminator(_item_kind),
]


class FunctionTool(StrictModel):
    type: Literal["function"]
    name: Annotated[str, Field(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_template(self) -> dict[str, Any]:
        fn = FunctionDefinition(name=self.name, description=self.description, parameters=self.parameters)
        return {"type": "function", "function": fn.model_dump(exclude_none=True)}


class NamedFunction(StrictModel):
    type: Literal["function"]
    name: str


class TextFormat(StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(StrictModel):
    format: TextFormat | None = None
    # OpenAI's models write shorter or longer answers; no open model has such a switch.
    verbosity: None = Field(default=None, description="not supported")

    @field_validator("verbosity", mode="before")
    @classmethod
    def _refuse_verbosity(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("text.verbosity is not supported (the model has no such switch)")
        return None


class ReasoningConfig(StrictModel):
    # Passed to the chat template as `reasoning_effort` (templates that read it honour it).
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # Summaries are written by a second model at OpenAI; the reasoning item carries the whole
    # thinking instead (`content`, as `reasoning_text`).
    summary: None = Field(default=None, description="not supported")
    generate_summary: None = Field(default=None, description="not supported")

    @field_validator("summary", "generate_summary", mode="before")
    @classmethod
    def _refuse_summary(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("reasoning summaries are not generated; the reasoning item's content "
                             "carries the whole thinking")
        return None


# Fields of OpenAI's API that would change the output but have no equivalent here: a 400 naming
# the field, never a response that looks like it honoured them.
UNSERVED_FIELDS = {
    "conversation": "server-side conversations are not served; chain turns with previous_response_id",
    "prompt": "stored prompt templates are not served; send instructions and input",
    "max_tool_calls": "a limit on built-in tool calls is not served (only function tools are)",
    "context_management": "server-side context compaction is not served",
    "background": "background responses are not served",
}


class ResponsesRequest(StrictModel):
    model: str | None = None
    input: Union[str, Annotated[list[InputItem], Field(max_length=MAX_MESSAGES)]]
    instructions: str | None = None
    tools: Annotated[list[FunctionTool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedFunction, None] = None
    parallel_tool_calls: bool = True
    max_output_tokens: PositiveInt64 | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (drop old turns to fit) is not served
    # Extra output (logprobs, encrypted reasoning, sources of built-in tools) is not produced.
    include: Annotated[list[str], Field(max_length=0)] | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=0)] | None = None
    # Accepted as OpenAI sends them; they do not change the output.
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    # Refused when set (UNSERVED_FIELDS).
    conversation: None = Field(default=None, description="not supported")
    prompt: None = Field(default=None, description="not supported")
    max_tool_calls: None = Field(default=None, description="not supported")
    context_management: None = Field(default=None, description="not supported")
    background: None = Field(default=None, description="not supported (false is accepted)")
    # tokenmill / vLLM extras, as on the chat route.
    timeout: Timeout | None = None
    seed: Int64 | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking_token_budget: Annotated[int, Field(ge=0, le=INT64_MAX)] | None = None
    priority: Int64 = 0
    cache_salt: str | None = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _refuse_reserved_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return check_template_kwargs(value)

    @field_validator(*UNSERVED_FIELDS, mode="before")
    @classmethod
    def _refuse_unserved(cls, value: Any, info: ValidationInfo) -> None:
        if value not in (None, False):
            raise ValueError(f"not supported: {UNSERVED_FIELDS[info.field_name]}")
        return None

    @model_validator(mode="after")
    def _check(self) -> "ResponsesRequest":
        fmt = self.text.format if self.text is not None else None
        if fmt is not None and fmt.type == "json_schema" and fmt.schema_ is None:
            raise ValueError("text.format.schema must be a JSON schema object")
        return self

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [t.to_template() for t in self.tools] if self.tools else None

    def tool_choice_value(self) -> str | dict[str, Any] | None:
        choice = self.tool_choice
        if isinstance(choice, NamedFunction):
            return {"type": "function", "function": {"name": choice.name}}
        return choice

    def template_kwargs(self) -> dict[str, Any] | None:
        kwargs = dict(self.chat_template_kwargs or {})
        effort = self.reasoning.effort if self.reasoning is not None else None
        if effort is not None:
            kwargs.setdefault("reasoning_effort", effort)
        return kwargs or None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        fmt = self.text.format if self.text is not None else None
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=fmt.schema_)

    def to_sampling_params(self, defaults: dict[str, Any] | None = None) -> SamplingParams:
        d = defaults or {}
        return SamplingParams(
            temperature=d.get("temperature", 1.0) if self.temperature is None else self.temperature,
            top_p=d.get("top_p", 1.0) if self.top_p is None else self.top_p,
            top_k=d.get("top_k", 0) if self.top_k is None else self.top_k,
            seed=self.seed,
            max_tokens=self.max_output_tokens if self.max_output_tokens is not None else d.get("max_tokens"),
            structured_outputs=self.structured_outputs(),
            output_kind=RequestOutputKind.DELTA if self.stream else RequestOutputKind.FINAL_ONLY,
        )

    def input_messages(self) -> list[dict[str, Any]]:
        """This request's input as chat-template messages (without `instructions`)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        return items_to_messages(self.input)


def items_to_messages(items: list) -> list[dict[str, Any]]:
    """Responses input items -> chat-template messages: calls join their assistant turn, outputs
    become tool messages, reasoning goes to the next assistant turn."""
    messages: list[dict[str, Any]] = []
    reasoning = ""

    def assistant_turn() -> dict[str, Any]:
        nonlocal reasoning
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant" or (last.get("tool_calls") and reasoning):
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        if reasoning:
            last["reasoning_content"] = last.get("reasoning_content", "") + reasoning
            reasoning = ""
        return last

    for item in items:
        if isinstance(item, ReasoningItem):
            reasoning += item.text()
        elif isinstance(item, FunctionCallItem):
            turn = assistant_turn()
            turn.setdefault("tool_calls", []).append(
                {"id": item.call_id, "type": "function",
                 "function": {"name": item.name, "arguments": item.arguments}})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text()})
        elif item.role == "assistant":
            turn = assistant_turn()
            turn["content"] = (turn["content"] or "") + item.text()
        else:
            role = "system" if item.role == "developer" else item.role
            messages.append({"role": role, "content": item.text()})
    return messages
