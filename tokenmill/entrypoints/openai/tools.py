"""Tool calling for /v1/chat/completions: which constraint and which parser a request gets, and
how parsed calls look on the wire (OpenAI's `tool_calls` message field and streamed deltas).

- `tool_choice` "required" or a named function: a grammar forces the calls (`tool_grammar.py`),
  and the matching forced parser reads them back, so the arguments always parse.
- "auto" (the default when `tools` are given): the model decides; the server's
  `--tool-call-parser` (hermes, llama3_json, ...) finds the calls in its text. Without that flag
  the text is returned as content.
- "none", or no tools: plain content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
from tokenmill.entrypoints.tool_parsers import DeltaMessage, ToolParser, get_tool_parser, make_tool_call_id
from tokenmill.entrypoints.tool_parsers.tool_grammar import forced_tool_call_parser, tool_choice_params
from tokenmill.sampling_params import StructuredOutputsParams


@dataclass(frozen=True)
class ToolCalling:
    constraint: StructuredOutputsParams | None = None
    make_parser: Callable[[], ToolParser] | None = None

    @property
    def active(self) -> bool:
        return self.make_parser is not None


def plan_tool_calling(body: ChatCompletionRequest, default_parser: str | None) -> ToolCalling:
    """Raises `ValueError` (-> 400) for a tool_choice naming no given tool, or a bad one."""
    if not body.tools or body.tool_choice == "none":
        return ToolCalling()
    choice = body.tool_choice_value()
    constraint = tool_choice_params(body.template_tools(), choice, body.parallel_tool_calls)
    if constraint is not None:
        named = choice["function"]["name"] if isinstance(choice, dict) else None
        return ToolCalling(constraint, lambda: forced_tool_call_parser(named))
    if default_parser:
        return ToolCalling(None, get_tool_parser(default_parser))
    return ToolCalling()


def message_from_text(text: str, parser: ToolParser | None) -> tuple[dict, bool]:
    """The assistant message for a finished choice, and whether it called tools."""
    if parser is None:
        return {"role": "assistant", "content": text}, False
    result = parser.extract_tool_calls(text)
    if not result.tools_called:
        return {"role": "assistant", "content": text}, False
    calls = [{"id": make_tool_call_id(), "type": "function",
              "function": {"name": c.name, "arguments": c.arguments}} for c in result.tool_calls]
    return {"role": "assistant", "content": result.content, "tool_calls": calls}, True


def delta_to_openai(*deltas: DeltaMessage | None) -> dict:
    """One `delta` object from the parser's streaming output(s)."""
    content = "".join(d.content for d in deltas if d is not None and d.content)
    out: dict = {"content": content} if content else {}
    calls = []
    for d in deltas:
        if d is None:
            continue
        for t in d.tool_calls:
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
