"""Parsers for output generated under the forced tool-call grammars of `tool_grammar.py`.

`tool_choice="required"` output is `[{"name": ..., "arguments": {...}}, ...]`; a named tool_choice's
output is the arguments object alone. Both stream like the model-format parsers (name first, then
argument fragments), so the server handles every tool_choice with one streaming loop.

The grammar makes every complete call valid, so output cut off by `max_tokens` still yields the
calls completed before the cut (the unfinished last one is dropped, and the text is never
returned as content: it is a fragment of JSON, not an answer).
"""

from __future__ import annotations

import json

from tokenmill.entrypoints.tool_parsers.base import CallText, ExtractedToolCalls, ToolCall, ToolParser
from tokenmill.entrypoints.tool_parsers.json_text import json_call, scan_json_value, skip_ws


class _ForcedParser(ToolParser):
    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        _, calls = self._split(text, final=True)
        complete = []
        for call in calls:
            if not call.done:
                break
            complete.append(ToolCall(call.name, call.arguments))
        return ExtractedToolCalls(bool(complete), complete, None)


class RequiredToolCallParser(_ForcedParser):
    """Output of `required_tool_calls_params`: a JSON array of call objects."""

    name = "required"

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return "", []
        calls = []
        i += 1
        while True:
            i = skip_ws(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            if i >= len(text) or text[i] != "{":
                return "", calls
            end = scan_json_value(text, i)
            calls.append(json_call(text[i:] if end is None else text[i:end]))
            if end is None:
                return "", calls
            i = end


class NamedToolCallParser(_ForcedParser):
    """Output of `named_tool_params`: the arguments object of the one named function."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self.function_name = function_name
        # The output read as the body of a call object, so the shared code streams it.
        self._prefix = '{"name": ' + json.dumps(function_name) + ', "arguments": '

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        return "", [json_call(self._prefix + text[skip_ws(text, 0):])]
