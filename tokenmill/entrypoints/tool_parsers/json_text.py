"""Reading tool-call JSON while it is still being written: where a value ends, what a call object's
name and arguments are so far, and which part of its arguments can already be streamed.

Arguments stream as the model writes them: an object or array only ever grows, so its text so far
can go out; a string (sent unwrapped) or a bare literal goes out once complete. Streamed fragments
therefore add up to exactly the `arguments` text the non-streaming parse gives.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from tokenmill.entrypoints.tool_parsers.base import CallText

_WS = " \t\r\n"


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


def _loads(text: str) -> tuple[bool, object]:
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False, None


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
        ok, key = _loads(obj_text[i:key_end])
        if not ok:
            return out
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
        if key == "name" and obj_text[i] == '"' and out.name is None:
            try:
                name, _ = decoder.raw_decode(obj_text, i)
            except json.JSONDecodeError:
                return out
            out.name = name if isinstance(name, str) else None
        if i == out.args_start:
            out.args_end = end
        i = end


def json_call(obj_text: str) -> CallText:
    """One `{"name": str, "arguments"|"parameters": ...}` object, finished or not, as a `CallText`.

    `arguments` is the model's own text of the value (so streamed fragments add up to it); a call
    without arguments gets "{}" once its object closes; arguments given as a JSON string are
    unwrapped. The call is `done` once its name and arguments are complete and valid: an object
    cut off after complete arguments (the model stopped before the last "}") still counts.
    """
    partial = read_partial_call(obj_text)
    if partial.args_start is None:
        done = partial.complete and partial.name is not None and _loads(obj_text)[0]
        return CallText(partial.name, "{}" if partial.complete else "", done)
    first = obj_text[partial.args_start]
    if partial.args_end is None:
        # Objects and arrays only ever append; a string or literal goes out once complete.
        return CallText(partial.name, obj_text[partial.args_start:] if first in "{[" else "", False)
    raw = obj_text[partial.args_start:partial.args_end]
    ok, value = _loads(raw)
    if ok and partial.complete:
        ok = _loads(obj_text)[0]
    arguments = value if ok and isinstance(value, str) else raw
    if first == '"' and not ok:
        arguments = ""  # an invalid string cannot be unwrapped: nothing of it is sent
    return CallText(partial.name, arguments, ok and partial.name is not None)


def json_arguments(name: str | None, text: str, start: int, call_id: str | None = None) -> CallText:
    """A call whose name is known from the format's markers and whose arguments are the raw JSON
    value at `text[start:]` (DeepSeek, Kimi-K2, Mistral). Trailing markers after the value are not
    part of it."""
    start = skip_ws(text, start)
    if start >= len(text):
        return CallText(name, "", False, call_id)
    end = scan_json_value(text, start)
    if end is None:
        return CallText(name, text[start:] if text[start] in "{[" else "", False, call_id)
    raw = text[start:end]
    ok, value = _loads(raw)
    return CallText(name, raw if ok or text[start] in "{[" else "", ok and isinstance(value, dict), call_id)
