"""What every tool-call parser returns, and the streaming they share.

A parser turns the model's raw text into OpenAI-style tool calls. Non-streaming:
`extract_tool_calls(text)`. Streaming: one parser instance per response, fed
`extract_tool_calls_streaming(previous_text, current_text, delta_text)` after every new piece of
text, then `finish_streaming(text)`; each call returns what is new (content and/or tool-call
fragments) or None. A call's first delta carries its index, id and name (and any argument text
already known); later deltas carry argument text only, and the fragments concatenate to exactly
the `arguments` string `extract_tool_calls` gives for the same text.

A format is one method, `_split(text, final)`: the content that is safe to show and, for every
call begun so far, a `CallText` (name once complete, argument text that can be sent, whether the
call is done). Streaming and the non-streaming result both come from it, so they cannot disagree.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class ToolCall(NamedTuple):
    """One parsed call: the function name and its arguments as JSON text (as the model wrote it)."""

    name: str
    arguments: str
    id: str | None = None  # the model's own id for the call (Kimi-K2's `functions.f:0`), else None


@dataclass(slots=True)
class ExtractedToolCalls:
    tools_called: bool
    tool_calls: list[ToolCall] = field(default_factory=list)
    content: str | None = None  # text outside the tool calls (None if empty)


@dataclass(slots=True)
class DeltaToolCall:
    index: int  # position of the call in the response's tool_calls list
    id: str | None = None  # first delta of a call only
    name: str | None = None  # first delta of a call only
    arguments: str | None = None  # a fragment of the arguments JSON text


@dataclass(slots=True)
class DeltaMessage:
    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)


@dataclass(slots=True)
class CallText:
    """What the text of one call tells so far."""

    name: str | None  # once the name is complete
    arguments: str  # argument text that can be sent; only ever grows as the text grows
    done: bool  # name and arguments complete and valid: the call counts in a final result
    id: str | None = None  # the model's own call id, when the format has one


def make_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_suffix(text: str, *markers: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `markers` (text
    that might still turn into that marker, so it cannot be shown yet)."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best


def delimited_bodies(text: str, start: int, begin: str, end: str) -> list[tuple[str, bool]]:
    """The bodies between `begin` and `end` markers from `start` on, each with whether its `end`
    was seen (the last one may still be growing)."""
    bodies = []
    pos = text.find(begin, start)
    while pos >= 0:
        body_start = pos + len(begin)
        stop = text.find(end, body_start)
        if stop < 0:
            bodies.append((text[body_start:], False))
            break
        bodies.append((text[body_start:stop], True))
        pos = text.find(begin, stop)
    return bodies


class ToolParser(ABC):
    """One instance per response (the streaming methods keep what was already sent).

    Args:
        tools: the request's tools (OpenAI form), for formats that write arguments as text and
            need each parameter's type to turn them back into JSON (MiniMax-M2).
    """

    name: str = ""
    # Marker strings of the format; a request must keep them in its text (skip_special_tokens
    # off) when the tokenizer counts one of them as a special token.
    markers: tuple[str, ...] = ()

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []
        self._sent_content = 0  # characters of content already streamed
        self._sent_calls: list[list] = []  # per call: [id, argument chars sent]

    @abstractmethod
    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        """(content that is safe to show, every call begun so far).

        Content must exclude any suffix that might still turn into a tool-call marker.
        """

    def new_call_id(self) -> str:
        return make_tool_call_id()

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        """The calls in a finished response. Malformed calls (unparsable arguments) make the
        whole text content: showing it beats inventing a call."""
        content, calls = self._split(text, final=True)
        if not calls:
            return ExtractedToolCalls(False, content=text or None)
        if not all(c.done for c in calls):
            return ExtractedToolCalls(False, content=text)
        return ExtractedToolCalls(True, [ToolCall(c.name, c.arguments, c.id) for c in calls],
                                  content if content.strip() else None)

    def extract_tool_calls_streaming(
        self, previous_text: str, current_text: str, delta_text: str
    ) -> DeltaMessage | None:
        """What to send for the latest `delta_text` (None: nothing yet)."""
        return self._stream(current_text, final=False)

    def finish_streaming(self, text: str) -> DeltaMessage | None:
        """Flush held-back text at the end of the response (e.g. a partial marker that never
        completed is content after all)."""
        return self._stream(text, final=True)

    def _stream(self, text: str, final: bool) -> DeltaMessage | None:
        content, calls = self._split(text, final)
        delta = DeltaMessage()
        if len(content) > self._sent_content:
            delta.content = content[self._sent_content:]
            self._sent_content = len(content)
        for index, call in enumerate(calls):
            piece = None
            if index == len(self._sent_calls):
                if call.name is None:
                    break  # calls go out in order; this one's name is not readable yet
                call_id = call.id or self.new_call_id()
                self._sent_calls.append([call_id, 0])
                piece = DeltaToolCall(index, id=call_id, name=call.name, arguments="")
            sent = self._sent_calls[index][1]
            if len(call.arguments) > sent:
                piece = piece or DeltaToolCall(index, arguments="")
                piece.arguments += call.arguments[sent:]
                self._sent_calls[index][1] = len(call.arguments)
            if piece is not None:
                delta.tool_calls.append(piece)  # one entry per call and delta: index, name, text
        if delta.content is None and not delta.tool_calls:
            return None
        return delta
