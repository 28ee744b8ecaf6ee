"""Content blocks for /v1/messages: Anthropic's `tool_choice` mapped onto the shared grammars and
parsers (`tool_parsers/`), and parsed output rendered as `thinking`, `text` and `tool_use` blocks.

Streaming opens blocks as they appear: a thinking block while the model thinks (only when the
request enabled thinking), a text block when text arrives, one `tool_use` block per call
(`content_block_start` with id and name, then `input_json_delta` fragments), each closed by
`content_block_stop` before the next opens.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from tokenmill.entrypoints.anthropic.protocol import MessagesRequest
from tokenmill.entrypoints.openai.tools import ToolCalling, plan_tool_calling
from tokenmill.entrypoints.server.output_parsing import OutputDelta, ParsedOutput
from tokenmill.entrypoints.server.serving import sse
from tokenmill.entrypoints.tool_parsers import ToolParser


def tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


def plan_tool_use(body: MessagesRequest, parser_class: type[ToolParser] | None) -> ToolCalling:
    """Raises `ValueError` (-> 400) for a tool_choice naming no given tool, a bad one, or "auto"
    (the default) on a server without a tool parser."""
    tools = body.template_tools()
    if not tools:
        return ToolCalling()
    choice = body.tool_choice.model_dump() if body.tool_choice is not None else {"type": "auto"}
    parallel = not choice.get("disable_parallel_tool_use", False)
    if choice["type"] == "tool":
        openai_choice = {"type": "function", "function": {"name": choice["name"]}}
    else:
        openai_choice = {"any": "required"}.get(choice["type"], choice["type"])
    return plan_tool_calling(tools, openai_choice, parallel, parser_class)


def _tool_input(arguments: str) -> dict:
    try:
        value = json.loads(arguments)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def content_blocks(parsed: ParsedOutput, show_thinking: bool, redact_thinking: bool = False) -> list[dict]:
    """The response's content blocks: thinking (when asked for), text, then tool uses; at least
    one (an empty text block when the model produced nothing)."""
    blocks: list[dict] = []
    if show_thinking and parsed.reasoning:
        blocks.append({"type": "thinking", "thinking": "" if redact_thinking else parsed.reasoning,
                       "signature": ""})
    if parsed.content:
        blocks.append({"type": "text", "text": parsed.content})
    for call in parsed.tool_calls:
        blocks.append({"type": "tool_use", "id": tool_use_id(), "name": call.name,
                       "input": _tool_input(call.arguments)})
    if not parsed.content and not parsed.tool_calls:
        blocks.append({"type": "text", "text": ""})
    return blocks


@dataclass
class BlockStreamer:
    """Turns streamed output deltas into Anthropic content-block events.

    Args:
        show_thinking: thinking blocks are sent (the request enabled thinking).
        redact_thinking: their text is left out (`display: "omitted"`).
    """

    show_thinking: bool = False
    redact_thinking: bool = False
    index: int = -1
    open_kind: str | None = None  # "thinking" | "text" | "tool_use" | None
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

    def _delta(self, delta: dict) -> None:
        self.events.append(sse({"type": "content_block_delta", "index": self.index, "delta": delta},
                               event="content_block_delta"))

    def open_text(self) -> list[bytes]:
        """Open the text block at once (a response that can only be text)."""
        self._open({"type": "text", "text": ""}, "text")
        return self._take()

    def feed(self, delta: OutputDelta | None) -> list[bytes]:
        if delta is not None:
            if delta.reasoning and self.show_thinking:
                if self.open_kind != "thinking":
                    self._open({"type": "thinking", "thinking": "", "signature": ""}, "thinking")
                if not self.redact_thinking:
                    self._delta({"type": "thinking_delta", "thinking": delta.reasoning})
            if delta.content:
                if self.open_kind != "text":
                    self._open({"type": "text", "text": ""}, "text")
                self._delta({"type": "text_delta", "text": delta.content})
            for call in delta.tool_calls:
                if call.name is not None:
                    self._open({"type": "tool_use", "id": tool_use_id(), "name": call.name, "input": {}},
                               "tool_use")
                    self.open_call = call.index
                    self.used_tool = True
                if call.arguments and self.open_call == call.index:
                    self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        return self._take()

    def finish(self) -> list[bytes]:
        # Nothing but thinking (or nothing at all) still ends with one, empty, text block.
        if self.index < 0 or (self.open_kind == "thinking" and not self.used_tool):
            self._open({"type": "text", "text": ""}, "text")
        self._close()
        return self._take()

    def _take(self) -> list[bytes]:
        events, self.events = self.events, []
        return events
