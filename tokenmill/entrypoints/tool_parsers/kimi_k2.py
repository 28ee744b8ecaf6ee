"""Kimi-K2 format: `<|tool_calls_section_begin|>` then, per call,
`<|tool_call_begin|>functions.NAME:INDEX<|tool_call_argument_begin|>{ARGS}<|tool_call_end|>`, then
`<|tool_calls_section_end|>`. The call id (`functions.NAME:INDEX`) is the model's own: its chat
template writes it back when the tool's result comes in, so it is returned as the call's id."""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import CallText, ToolParser, delimited_bodies, held_suffix
from tokenmill.entrypoints.tool_parsers.json_text import json_arguments

SECTION_BEGINS = ("<|tool_calls_section_begin|>", "<|tool_call_section_begin|>")  # both spellings occur
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


class KimiK2ToolParser(ToolParser):
    name = "kimi_k2"
    markers = (*SECTION_BEGINS, "<|tool_calls_section_end|>", CALL_BEGIN, ARG_BEGIN, CALL_END)

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        found = [i for i in (text.find(m) for m in SECTION_BEGINS) if i >= 0]
        if not found:
            held = 0 if final else held_suffix(text, *SECTION_BEGINS)
            return text[: len(text) - held], []
        first = min(found)
        calls = [self._call(body) for body, _ in delimited_bodies(text, first, CALL_BEGIN, CALL_END)]
        return text[:first], calls

    @staticmethod
    def _call(body: str) -> CallText:
        arg = body.find(ARG_BEGIN)
        if arg < 0:
            return CallText(None, "", False)
        call_id = body[:arg].strip()
        name = call_id.split(":")[0].split(".")[-1]  # "functions.get_weather:0" -> get_weather
        return json_arguments(name or None, body, arg + len(ARG_BEGIN), call_id=call_id or None)
