"""Parsers for output generated under the forced tool-call grammars of `tool_grammar.py`.

`tool_choice="required"` output is `[{"name": ..., "arguments": {...}}, ...]`; a named tool_choice's
output is the arguments object alone. Both stream like the model-format parsers (name first, then
argument fragments), so the server handles every tool_choice with one streaming loop.
"""

from __future__ import annotations

import json

from tokenmill.entrypoints.tool_parsers.base import (
    ExtractedToolCalls,
    ToolParser,
    parse_call_object,
    scan_json_value,
    skip_ws,
)


class RequiredToolCallParser(ToolParser):
    """Output of `required_tool_calls_params`: a JSON array of call objects."""

    name = "required"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        _, objects = self._split(text, final=True)
        calls = [parse_call_object(obj) for obj in objects]
        if not calls or any(c is None for c in calls):
            return ExtractedToolCalls(False, content=text or None)
        return ExtractedToolCalls(True, calls, None)

    def _split(self, text: str, final: bool) -> tuple[str, list[str]]:
        i = skip_ws(text, 0)
        if i >= len(text) or text[i] != "[":
            return "", []
        objects = []
        i += 1
        while True:
            i = skip_ws(text, i)
            if i < len(text) and text[i] == ",":
                i += 1
                continue
            if i >= len(text) or text[i] != "{":
                return "", objects
            end = scan_json_value(text, i)
            objects.append(text[i:] if end is None else text[i:end])
            if end is None:
                return "", objects
            i = end


class NamedToolCallParser(ToolParser):
    """Output of `named_tool_params`: the arguments object of the one named function."""

    name = "named"

    def __init__(self, function_name: str) -> None:
        super().__init__()
        self.function_name = function_name
        # The output read as the body of a call object, so the shared code streams it.
        self._prefix = '{"name": ' + json.dumps(function_name) + ', "arguments": '

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        _, objects = self._split(text.strip(), final=True)
        call = parse_call_object(objects[0])
        if call is None:
            return ExtractedToolCalls(False, content=text or None)
        return ExtractedToolCalls(True, [call], None)

    def _split(self, text: str, final: bool) -> tuple[str, list[str]]:
        return "", [self._prefix + text[skip_ws(text, 0):]]
