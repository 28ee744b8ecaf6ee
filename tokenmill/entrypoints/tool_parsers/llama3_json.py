"""Llama 3.1 / 3.2 JSON format: the whole reply is `{"name": ..., "parameters": {...}}` (or
"arguments"), optionally after `<|python_tag|>`, several calls separated by `;`."""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import (
    ExtractedToolCalls,
    ToolParser,
    parse_call_object,
    scan_json_value,
    skip_ws,
)

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        _, objects = self._split(text, final=True)
        if not objects:
            return ExtractedToolCalls(False, content=text or None)
        calls = [parse_call_object(obj) for obj in objects]
        if any(c is None for c in calls):
            return ExtractedToolCalls(False, content=text)
        return ExtractedToolCalls(True, calls, None)

    def _split(self, text: str, final: bool) -> tuple[str, list[str]]:
        i = skip_ws(text, 0)
        rest = text[i:]
        if not final and (not rest or (PYTHON_TAG.startswith(rest) and rest != PYTHON_TAG)):
            return "", []  # too early to tell content from a call
        if rest.startswith(PYTHON_TAG):
            i = skip_ws(text, i + len(PYTHON_TAG))
        if i >= len(text) or text[i] != "{":
            if rest.startswith(PYTHON_TAG) and not final:
                return "", []
            return text, []
        objects = []
        while i < len(text) and text[i] == "{":
            end = scan_json_value(text, i)
            if end is None:
                objects.append(text[i:])
                break
            objects.append(text[i:end])
            i = skip_ws(text, end)
            if i < len(text) and text[i] == ";":
                i = skip_ws(text, i + 1)
        return "", objects
