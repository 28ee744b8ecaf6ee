"""Hermes / Qwen format: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, repeated
for parallel calls, optionally after some plain text."""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import ExtractedToolCalls, ToolParser, parse_call_object

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def _held_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class HermesToolParser(ToolParser):
    name = "hermes"

    def extract_tool_calls(self, text: str) -> ExtractedToolCalls:
        content, bodies = self._split(text, final=True)
        if OPEN not in text:
            return ExtractedToolCalls(False, content=text or None)
        calls = [parse_call_object(body.strip()) for body in bodies]
        if not calls or any(c is None for c in calls):
            # Malformed JSON inside the tags: show the text rather than invent a call.
            return ExtractedToolCalls(False, content=text)
        return ExtractedToolCalls(True, calls, content if content.strip() else None)

    def _split(self, text: str, final: bool) -> tuple[str, list[str]]:
        first = text.find(OPEN)
        if first < 0:
            held = 0 if final else _held_suffix(text, OPEN)
            return text[: len(text) - held], []
        bodies = []
        pos = first
        while pos >= 0:
            start = pos + len(OPEN)
            end = text.find(CLOSE, start)
            if end < 0:
                body = text[start:]
                if not final:
                    # "...}\n</tool" must not count as part of the object; cut the partial tag.
                    body = body[: len(body) - _held_suffix(body, CLOSE)]
                bodies.append(body)
                break
            bodies.append(text[start:end])
            pos = text.find(OPEN, end + len(CLOSE))
        return text[:first], bodies
