"""Hermes / Qwen format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, repeated
for parallel calls, optionally after some plain text. Qwen 2.5 and Qwen3 write the same."""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import CallText, ToolParser, held_suffix
from tokenmill.entrypoints.tool_parsers.json_text import json_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"


class HermesToolParser(ToolParser):
    name = "hermes"
    markers = (OPEN, CLOSE)

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        first = text.find(OPEN)
        if first < 0:
            held = 0 if final else held_suffix(text, OPEN)
            return text[: len(text) - held], []
        calls = []
        pos = first
        while pos >= 0:
            start = pos + len(OPEN)
            end = text.find(CLOSE, start)
            if end < 0:
                body = text[start:]
                if not final:
                    # "...}\n</tool" must not count as part of the object; cut the partial tag.
                    body = body[: len(body) - held_suffix(body, CLOSE)]
                calls.append(json_call(body.strip()))
                break
            calls.append(json_call(text[start:end].strip()))
            pos = text.find(OPEN, end + len(CLOSE))
        return text[:first], calls
