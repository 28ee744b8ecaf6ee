"""Llama 3.1 / 3.2 JSON format: the whole reply is `{"name": ..., "parameters": {...}}` (or
"arguments"), optionally after `<|python_tag|>`, several calls separated by `;`."""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import CallText, ToolParser
from tokenmill.entrypoints.tool_parsers.json_text import json_call, scan_json_value, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    name = "llama3_json"
    markers = (PYTHON_TAG,)

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
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
        calls = []
        while i < len(text) and text[i] == "{":
            end = scan_json_value(text, i)
            if end is None:
                calls.append(json_call(text[i:]))
                break
            calls.append(json_call(text[i:end]))
            i = skip_ws(text, end)
            if i < len(text) and text[i] == ";":
                i = skip_ws(text, i + 1)
        return "", calls
