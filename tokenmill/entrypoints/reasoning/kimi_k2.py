"""Kimi-K2 (Thinking): `<think>` thinking `</think>` answer; a tool-call section opened straight
from the thinking (`<|tool_calls_section_begin|>`) also ends it, and stays in the answer for the
`kimi_k2` tool parser. The template's `thinking` variable switches thinking off."""

from __future__ import annotations

from tokenmill.entrypoints.reasoning.base import ReasoningParser


class KimiK2ReasoningParser(ReasoningParser):
    name = "kimi_k2"
    implicit_ends = ("<|tool_calls_section_begin|>",)
