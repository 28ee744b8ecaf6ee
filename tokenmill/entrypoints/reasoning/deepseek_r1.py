"""DeepSeek-R1 (and V3.1 / V3.2, whose templates write `<think>` or `</think>` at the end of the
prompt for thinking on or off): `<think>` thinking `</think>` answer. R1's template opens the
thinking in the prompt, so output before `</think>` is thinking even when the prompt's tail shows
no marker (the model then writes only the end marker)."""

from __future__ import annotations

from tokenmill.entrypoints.reasoning.base import ReasoningParser


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    opens_in_prompt = True
