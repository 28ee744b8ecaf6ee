"""Tool use for /v1/messages: Anthropic's `tool_choice` mapped onto the shared grammars and parsers
(`tool_parsers/`), and parsed calls rendered as `tool_use` content blocks.

Streaming with tools opens content blocks as they appear: a text block when text arrives, one
`tool_use` block per call (`content_block_start` with id and name, then `input_json_delta`
fragments), each closed by `content_block_stop` before the next opens.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Callable

from tokenmill.entrypoints.anthropic.protocol import MessagesRequest
from tokenmill.entrypoints.server.serving import sse
from tokenmill.entrypoints.tool_parsers import DeltaMessage, ToolParser, get_tool_parser
from tokenmill.entrypoints.tool_parsers.tool_grammar import forced_tool_call_parser, tool_choice_params
from tokenmill.sampling_params import StructuredOutputsParams


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolUse:
    constraint: StructuredOutputsParams | None = None
    make_parser: Callable[[], ToolParser] | None = None


def plan_tool_use(body: MessagesRequest, default_parser: str | None) -> ToolUse:
    """Raises `ValueError` (-> 400) for a tool_choice naming no given tool, or a bad one."""
    tools = body.template_tools()
    if not tools:
        return ToolUse()
    choice = body.tool_choice.model_dump() if body.tool_choice is not None else {"type": "auto"}
    parallel = not choice.get("disable_parallel_tool_use", False)
    constraint = tool_choice_params(tools, choice, parallel)
    if constraint is not None:
        named = choice["name"] if choice["type"] == "tool" else None
        return ToolUse(constraint, lambda: forced_tool_call_parser(named))
    if default_parser:
        return ToolUse(None, get_tool_parser(default_parser))
    return ToolUse()


def content_blocks(text: str, parser: ToolParser | None) -> tuple[list[dict], bool]:
    """The response's content blocks, and whether the model used a tool."""
    if parser is not None:
        result = parser.extract_tool_calls(text)
        if result.tools_called:
            blocks = [{"type": "text", "text": result.content}] if result.content else []
            for call in result.tool_calls:
                try:
                    arguments = json.loads(call.arguments)
                except ValueError:
                    arguments = {}
                blocks.append({"type": "tool_use", "id": tool_use_id(), "name": call.name,
                               "input": arguments if isinstance(arguments, dict) else {"value": arguments}})
            return blocks, True
    return [{"type": "text", "text": text}], False


@dataclass
class BlockStreamer:
    """Turns the parser's streaming deltas into Anthropic content-block events."""

    index: int = -1
    open_kind: str | None = None  # "text" | "tool_use" | None
    open_call: int | None = None  # the parser's call index of the open tool_use block
    used_tool: bool = False
    events: list[bytes] = field(default_factory=list)

    def _close(self) -> None:
        if self.open_kind is not None:
            self.events.append(sse({"type": "content_block_stop", "index": self.index}, event="content_block_stop"))
            self.open_kind, self.open_call = None, None

    def _open(self, block: dict, kind: str) -> None:
        self._close()
        self.index += 1
        self.open_kind = kind
        self.events.append(sse({"type": "content_block_start", "index": self.index, "content_block": block},
                               event="content_block_start"))

    def feed(self, delta: DeltaMessage | None) -> list[bytes]:
        if delta is not None:
            if delta.content:
                if self.open_kind != "text":
                    self._open({"type": "text", "text": ""}, "text")
                self.events.append(sse({"type": "content_block_delta", "index": self.index,
                                        "delta": {"type": "text_delta", "text": delta.content}},
                                       event="content_block_delta"))
            for call in delta.tool_calls:
                if call.name is not None:
                    self._open({"type": "tool_use", "id": tool_use_id(), "name": call.name, "input": {}},
                               "tool_use")
                    self.open_call = call.index
                    self.used_tool = True
                if call.arguments and self.open_call == call.index:
                    self.events.append(sse({"type": "content_block_delta", "index": self.index,
                                            "delta": {"type": "input_json_delta", "partial_json": call.arguments}},
                                           event="content_block_delta"))
        events, self.events = self.events, []
        return events

    def finish(self) -> list[bytes]:
        if self.index < 0:  # nothing at all was generated: still one (empty) text block
            self._open({"type": "text", "text": ""}, "text")
        self._close()
        events, self.events = self.events, []
        return events
