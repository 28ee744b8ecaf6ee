"""What every tool-call parser returns, and the JSON scanning they share.

A parser turns the model's raw text into OpenAI-style tool calls. Non-streaming:
`extract_tool_calls(text)`. Streaming: one parser instance per response, fed
`extract_tool_calls_streaming(previous_text, current_text, delta_text)` after every new piece of
text; each call returns what is new (content and/or tool-call fragments) or None. Each tool call's
first delta carries its index, id and name; later deltas carry argument text only, and the argument
fragments concatenate to exactly the `arguments` string `extract_tool_calls` gives for the same text.
"""

from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

_WS = " \t\r\n"


class ToolCall(NamedTuple):
    """One parsed call: the function name and its arguments as JSON text (as the model wrote it)."""

    name: str
    arguments: str


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


def make_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def scan_json_value(text: str, start: int) -> int | None:
    """End index (exclusive) of the JSON value starting at `text[start]`, or None if incomplete.

    Only tracks nesting and strings (no validation): enough to tell where a streamed value ends.
    """
    n = len(text)
    if start >= n:
        return None
    first = text[start]
    if first == '"':
        i = start + 1
        while i < n:
            c = text[i]
            if c == "\\":
                i += 2
                continue
            if c == '"':
                return i + 1
            i += 1
        return None
    if first in "{[":
        depth, i, in_str = 0, start, False
        while i < n:
            c = text[i]
            if in_str:
                if c == "\\":
                    i += 2
                    continue
                if c == '"':
                    in_str = False
            elif c == '"':
                in_str = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    # number / true / false / null: ends at a delimiter; at the end of the text it may go on.
    i = start
    while i < n and text[i] not in ",}]" + _WS:
        i += 1
    return i if i < n else None


def skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


@dataclass(slots=True)
class PartialCall:
    """What can be read so far from the text of one `{"name": ..., "arguments": ...}` object."""

    name: str | None = None  # set once the name string is complete
    args_start: int | None = None  # index of the arguments value in the object text
    args_end: int | None = None  # set once the arguments value is complete
    complete: bool = False  # the whole object is closed


def read_partial_call(obj_text: str, arg_keys: tuple[str, ...] = ("arguments", "parameters")) -> PartialCall:
    """Walk the top-level keys of a (possibly unfinished) JSON object, recording where things are."""
    out = PartialCall()
    decoder = json.JSONDecoder()
    i = skip_ws(obj_text, 0)
    if i >= len(obj_text) or obj_text[i] != "{":
        return out
    i += 1
    while True:
        i = skip_ws(obj_text, i)
        if i >= len(obj_text):
            return out
        if obj_text[i] == "}":
            out.complete = True
            return out
        if obj_text[i] == ",":
            i += 1
            continue
        key_end = scan_json_value(obj_text, i)
        if key_end is None or obj_text[i] != '"':
            return out
        key = json.loads(obj_text[i:key_end])
        i = skip_ws(obj_text, key_end)
        if i >= len(obj_text) or obj_text[i] != ":":
            return out
        i = skip_ws(obj_text, i + 1)
        if i >= len(obj_text):
            return out
        if key in arg_keys and out.args_start is None:
            out.args_start = i
        end = scan_json_value(obj_text, i)
        if end is None:
            return out
        if key == "name" and obj_text[i] == '"':
            try:
                out.name, _ = decoder.raw_decode(obj_text, i)
            except json.JSONDecodeError:
                return out
        if i == out.args_start:
            out.args_end = end
        i = end


def parse_call_object(obj_text: str) -> ToolCall | None:
    """A `{"name": str, "arguments"|"parameters": {...}}` object -> ToolCall, else None.

    `arguments` is the model's own text of the value (so streamed fragments add up to it); a call
    without arguments gets "{}"; arguments given as a JSON string are unwrapped. An object cut off
    after complete, valid arguments (the model stopped before the last "}") still counts, as it
    did while streaming.
    """
    partial = read_partial_call(obj_text)
    if partial.name is None or not isinstance(partial.name, str):
        return None
    if partial.args_start is None:
        return ToolCall(partial.name, "{}") if partial.complete else None
    if partial.args_end is None:
        return None
    raw = obj_text[partial.args_start : partial.args_end]
    try:
        value = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        return None
    if partial.complete:
        try:
            json.loads(obj_text)
        except (json.JSONDecodeError, RecursionError):
            return None
    return ToolCall(partial.name, value if isinstance(value, str) else raw)


class ToolParser(ABC):
    """One instance per response (the streaming methods keep what was already sent)."""

    name: str = ""

    def __init__(self) -> None:
        self._sent_content = 0  # characters of content already streamed
        self._sent_calls: list[tuple[str, int]] = []  # per call: (id, argument chars sent)

    @abstractmethod
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls: ...

    @abstractmethod
    def _split(self, text: str, final: bool) -> tuple[str, list[str]]:
        """(content that is safe to show, texts of the tool-call objects begun so far).

        Content must exclude any suffix that might still turn into a tool-call marker.
        """

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
            delta.content = content[self._sent_content :]
            self._sent_content = len(content)
        for index, obj_text in enumerate(calls):
            partial = read_partial_call(obj_text)
            if index == len(self._sent_calls):
                if partial.name is None:
                    break  # calls go out in order; this one's name is not readable yet
                call_id = make_tool_call_id()
                self._sent_calls.append((call_id, 0))
                delta.tool_calls.append(DeltaToolCall(index, id=call_id, name=partial.name, arguments=""))
            fragment = self._new_arguments(index, obj_text, partial)
            if fragment:
                delta.tool_calls.append(DeltaToolCall(index, arguments=fragment))
        if delta.content is None and not delta.tool_calls:
            return None
        return delta

    def _new_arguments(self, index: int, obj_text: str, partial: PartialCall) -> str:
        """The argument text of call `index` not sent yet (same rules as `parse_call_object`)."""
        call_id, sent = self._sent_calls[index]
        if partial.args_start is None:
            # No arguments key: "{}" once the object closes, as in the non-streaming result.
            if partial.complete and sent == 0:
                self._sent_calls[index] = (call_id, 2)
                return "{}"
            return ""
        first = obj_text[partial.args_start]
        if partial.args_end is None:
            # Objects and arrays only ever append; a string (sent unwrapped) or a bare literal is
            # sent once complete.
            if first not in "{[":
                return ""
            args = obj_text[partial.args_start :]
        else:
            args = obj_text[partial.args_start : partial.args_end]
            if first == '"':
                args = json.loads(args)
        if len(args) <= sent:
            return ""
        self._sent_calls[index] = (call_id, len(args))
        return args[sent:]
