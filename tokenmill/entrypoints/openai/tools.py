"""Tool calling for /v1/chat/completions: which constraint and which parser a request gets, and
how parsed output looks on the wire (OpenAI's message fields and streamed deltas).

- `tool_choice` "required" or a named function: a grammar forces the calls (`tool_grammar.py`),
  and the matching forced parser reads them back, so the arguments always parse. It takes
  precedence over `response_format`, which shapes a final answer: a forced turn has none
  (openai-agents sends both when an agent has an `output_type` and must call a tool).
- "auto" (the default when `tools` are given): the model decides; the server's
  `--tool-call-parser` (hermes, deepseek_v3, ...) finds the calls in its text. A server without
  one answers 400, as vLLM does: returning the calls as text would look like a plain answer.
- "none", or no tools: plain content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
from tokenmill.entrypoints.server.output_parsing import OutputDelta, ParsedOutput
from tokenmill.entrypoints.tool_parsers import ToolParser, make_tool_call_id
from tokenmill.entrypoints.tool_parsers.tool_grammar import forced_tool_call_parser, tool_choice_params
from tokenmill.sampling_params import StructuredOutputsParams

AUTO_NEEDS_PARSER = ('"auto" tool choice needs a server started with --tool-call-parser (the model\'s '
                     'tool-call format); give tool_choice "required", "none" or a named function')


@dataclass(frozen=True)
class ToolCalling:
    constraint: StructuredOutputsParams | None = None
    make_parser: Callable[[], ToolParser] | None = None

    @property
    def active(self) -> bool:
        return self.make_parser is not None


def plan_tool_calling(tools: list[dict] | None, tool_choice: str | dict | None, parallel_tool_calls: bool,
                      parser_class: type[ToolParser] | None) -> ToolCalling:
    """The plan for OpenAI-style `tools` (`{"type": "function", "function": {...}}` each) and
    `tool_choice` (None: "auto"). Raises `ValueError` (-> 400) for a tool_choice naming no given
    tool, a bad one, or "auto" on a server without a tool parser."""
    if not tools or tool_choice == "none":
        return ToolCalling()
    constraint = tool_choice_params(tools, tool_choice, parallel_tool_calls)
    if constraint is not None:
        named = tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None
        return ToolCalling(constraint, lambda: forced_tool_call_parser(named))
    if parser_class is None:
        raise ValueError(AUTO_NEEDS_PARSER)
    return ToolCalling(None, lambda: parser_class(tools))


def chat_tool_calling(body: ChatCompletionRequest, parser_class: type[ToolParser] | None) -> ToolCalling:
    return plan_tool_calling(body.template_tools(), body.tool_choice_value(), body.parallel_tool_calls,
                             parser_class)


def openai_tool_calls(parsed: ParsedOutput) -> list[dict]:
    return [{"id": c.id or make_tool_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in parsed.tool_calls]


def chat_message(parsed: ParsedOutput, role: str, with_reasoning: bool) -> dict:
    """The `message` of a finished choice. With a reasoning parser the thinking is
    `reasoning_content` (vLLM's name) and `reasoning` (the newer one), null when there is none."""
    message: dict = {"role": role, "content": parsed.content}
    if with_reasoning:
        message["reasoning_content"] = message["reasoning"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = openai_tool_calls(parsed)
    return message


def delta_to_openai(delta: OutputDelta) -> dict:
    """One streamed `delta` object: thinking, content and tool-call fragments, each call index
    once."""
    out: dict = {}
    if delta.reasoning:
        out["reasoning_content"] = out["reasoning"] = delta.reasoning
    if delta.content:
        out["content"] = delta.content
    calls = []
    for t in delta.tool_calls:
        call: dict = {"index": t.index}
        if t.id is not None:
            call.update(id=t.id, type="function")
        function = {}
        if t.name is not None:
            function["name"] = t.name
        if t.arguments is not None:
            function["arguments"] = t.arguments
        call["function"] = function
        calls.append(call)
    if calls:
        out["tool_calls"] = calls
    return out
