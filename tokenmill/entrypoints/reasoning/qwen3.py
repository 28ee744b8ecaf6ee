"""Qwen3: `<think>` thinking `</think>` answer. The hybrid models' template leaves the opening to
the model (`enable_thinking=False` closes the thinking in the prompt instead); Qwen3-Thinking-2507
and later templates open it in the prompt. Both are read from the prompt's tail."""

from __future__ import annotations

from tokenmill.entrypoints.reasoning.base import ReasoningParser


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"
