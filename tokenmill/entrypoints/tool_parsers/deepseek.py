"""DeepSeek formats: calls inside `<｜tool▁calls▁begin｜>...<｜tool▁calls▁end｜>`, one per
`<｜tool▁call▁begin｜>...<｜tool▁call▁end｜>`, after optional text.

- `deepseek_v3` (V3, R1): `function<｜tool▁sep｜>NAME\\n```json\\n{ARGS}\\n```` in each call.
- `deepseek_v31` (V3.1, V3.2 chat template): `NAME<｜tool▁sep｜>{ARGS}` in each call.
"""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import CallText, ToolParser, delimited_bodies, held_suffix
from tokenmill.entrypoints.tool_parsers.json_text import json_arguments

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
FENCE = "```json\n"


class _DeepSeekParser(ToolParser):
    markers = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)

    def _call(self, body: str) -> CallText:
        raise NotImplementedError

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        first = text.find(CALLS_BEGIN)
        if first < 0:
            held = 0 if final else held_suffix(text, CALLS_BEGIN)
            return text[: len(text) - held], []
        calls = [self._call(body) for body, _ in delimited_bodies(text, first, CALL_BEGIN, CALL_END)]
        return text[:first], calls


class DeepSeekV3ToolParser(_DeepSeekParser):
    name = "deepseek_v3"

    def _call(self, body: str) -> CallText:
        sep = body.find(SEP)
        if sep < 0:
            return CallText(None, "", False)
        rest = body[sep + len(SEP):]
        newline = rest.find("\n")
        if newline < 0:
            return CallText(None, "", False)  # the name ends with its line
        name, after = rest[:newline].strip(), rest[newline + 1:]
        if not after.startswith(FENCE):
            return CallText(name, "", False)
        return json_arguments(name, after, len(FENCE))


class DeepSeekV31ToolParser(_DeepSeekParser):
    name = "deepseek_v31"

    def _call(self, body: str) -> CallText:
        sep = body.find(SEP)
        if sep < 0:
            return CallText(None, "", False)
        return json_arguments(body[:sep].strip(), body, sep + len(SEP))
