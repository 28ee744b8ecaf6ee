"""A response's output items, whole or streamed as the SDK's event sequence.

Items, in order: a `reasoning` item (the thinking, as `reasoning_text` content), a `message`
(the answer as `output_text`), and one `function_call` per tool call. Streamed, each item is
opened (`response.output_item.added`, and `response.content_part.added` for text), grows
(`response.reasoning_text.delta`, `response.output_text.delta`,
`response.function_call_arguments.delta`) and is closed (the matching `.done` events, then
`response.output_item.done`) before the next opens; every event carries the next
`sequence_number`. The final `response.completed` (or `response.incomplete` when
`max_output_tokens` cut the answer) carries the same items the deltas built.
"""

from __future__ import annotations

import uuid
from typing import Any

from tokenmill.entrypoints.server.output_parsing import OutputDelta, ParsedOutput
from tokenmill.entrypoints.server.serving import sse
from tokenmill.entrypoints.tool_parsers import make_tool_call_id


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def reasoning_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id("rs"), "type": "reasoning", "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": status}


def message_item(text: str, status: str = "completed") -> dict[str, Any]:
    return {"id": item_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)]}


def function_call_item(name: str, arguments: str, call_id: str | None) -> dict[str, Any]:
    return {"id": item_id("fc"), "type": "function_call", "call_id": call_id or make_tool_call_id(),
            "name": name, "arguments": arguments, "status": "completed"}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_items(parsed: ParsedOutput, with_reasoning: bool, incomplete: bool) -> list[dict[str, Any]]:
    items = []
    if with_reasoning and parsed.reasoning:
        items.append(reasoning_item(parsed.reasoning))
    if parsed.content is not None or not parsed.tool_calls:
        items.append(message_item(parsed.content or "", "incomplete" if incomplete else "completed"))
    items.extend(function_call_item(c.name, c.arguments, c.id) for c in parsed.tool_calls)
    return items


def items_to_turn(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The response's output as the assistant turn a chat template reads (for the store)."""
    turn: dict[str, Any] = {"role": "assistant", "content": ""}
    for item in items:
        if item["type"] == "reasoning":
            turn["reasoning_content"] = "".join(p["text"] for p in item["content"])
        elif item["type"] == "message":
            turn["content"] += "".join(p["text"] for p in item["content"])
        else:
            turn.setdefault("tool_calls", []).append(
                {"id": item["call_id"], "type": "function",
                 "function": {"name": item["name"], "arguments": item["arguments"]}})
    return [turn]


class ResponseEvents:
    """The event stream of one response: feed it the output's deltas, then finish it.

    Args:
        with_reasoning: reasoning items are streamed (a reasoning parser is on).
    """

    def __init__(self, with_reasoning: bool) -> None:
        self.with_reasoning = with_reasoning
        self.items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._call_index: int | None = None  # the parser's index of the open function call
        self._sequence = 0

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return sse(data, event=kind)

    def feed(self, delta: OutputDelta | None) -> list[bytes]:
        out: list[bytes] = []
        if delta is None:
            return out
        if delta.reasoning and self.with_reasoning:
            if self._kind() != "reasoning":
                out += self._start({"id": item_id("rs"), "type": "reasoning", "summary": [], "content": [],
                                    "status": "in_progress"}, {"type": "reasoning_text", "text": ""})
            self._open["content"][0]["text"] += delta.reasoning
            out.append(self.event("response.reasoning_text.delta", **self._where(), content_index=0,
                                  delta=delta.reasoning))
        if delta.content:
            if self._kind() != "message":
                out += self._start({"id": item_id("msg"), "type": "message", "role": "assistant",
                                    "status": "in_progress", "content": []}, _text_part(""))
            self._open["content"][0]["text"] += delta.content
            out.append(self.event("response.output_text.delta", **self._where(), content_index=0,
                                  delta=delta.content, logprobs=[]))
        for call in delta.tool_calls:
            if call.name is not None:
                out += self._start({"id": item_id("fc"), "type": "function_call",
                                    "call_id": call.id or make_tool_call_id(), "name": call.name,
                                    "arguments": "", "status": "in_progress"})
                self._call_index = call.index
            if call.arguments and self._kind() == "function_call" and self._call_index == call.index:
                self._open["arguments"] += call.arguments
                out.append(self.event("response.function_call_arguments.delta", **self._where(),
                                      delta=call.arguments))
        return out

    def finish(self, incomplete: bool) -> list[bytes]:
        """Close the open item; a response with no item at all gets an empty message."""
        out = []
        if not self.items:
            out += self._start({"id": item_id("msg"), "type": "message", "role": "assistant",
                                "status": "in_progress", "content": []}, _text_part(""))
        out += self._close(incomplete)
        return out

    # ----- items -----
    def _kind(self) -> str | None:
        return self._open["type"] if self._open is not None else None

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._open["id"], "output_index": len(self.items) - 1}

    def _start(self, item: dict[str, Any], part: dict[str, Any] | None = None) -> list[bytes]:
        out = self._close(False)
        self.items.append(item)
        self._open = item
        out.append(self.event("response.output_item.added", output_index=len(self.items) - 1,
                              item={**item, "content": []} if "content" in item else dict(item)))
        if part is not None:
            item["content"].append(part)
            out.append(self.event("response.content_part.added", **self._where(), content_index=0,
                                  part=dict(part)))
        return out

    def _close(self, incomplete: bool) -> list[bytes]:
        item = self._open
        if item is None:
            return []
        out = []
        where = self._where()
        if item["type"] == "reasoning":
            part = item["content"][0]
            out.append(self.event("response.reasoning_text.done", **where, content_index=0, text=part["text"]))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
        elif item["type"] == "message":
            part = item["content"][0]
            out.append(self.event("response.output_text.done", **where, content_index=0, text=part["text"],
                                  logprobs=[]))
            out.append(self.event("response.content_part.done", **where, content_index=0, part=part))
        else:
            out.append(self.event("response.function_call_arguments.done", **where, name=item["name"],
                                  arguments=item["arguments"]))
        item["status"] = "incomplete" if incomplete and item["type"] == "message" else "completed"
        out.append(self.event("response.output_item.done", output_index=where["output_index"], item=item))
        self._open, self._call_index = None, None
        return out
