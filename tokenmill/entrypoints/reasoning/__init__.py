"""Reasoning parsers, keyed by the name the server's `--reasoning-parser` flag takes (vLLM's names).
One parser per response, built from the prompt the chat template rendered:

    parser = get_reasoning_parser("qwen3").for_prompt(prompt)
    parser.extract_reasoning(text)          # (thinking, answer), non-streaming
    parser.stream(text_so_far)              # what is new; stream(text, final=True) at the end
"""

from __future__ import annotations

from tokenmill.entrypoints.reasoning.base import ReasoningDelta, ReasoningParser, Start
from tokenmill.entrypoints.reasoning.deepseek_r1 import DeepSeekR1ReasoningParser
from tokenmill.entrypoints.reasoning.kimi_k2 import KimiK2ReasoningParser
from tokenmill.entrypoints.reasoning.minimax_m2 import (
    MiniMaxM2AppendThinkReasoningParser,
    MiniMaxM2ReasoningParser,
)
from tokenmill.entrypoints.reasoning.qwen3 import Qwen3ReasoningParser

REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "deepseek_v3": DeepSeekR1ReasoningParser,  # V3.1 / V3.2: the prompt says thinking on or off
    "qwen3": Qwen3ReasoningParser,
    "kimi_k2": KimiK2ReasoningParser,
    "minimax_m2": MiniMaxM2ReasoningParser,
    "minimax_m2_append_think": MiniMaxM2AppendThinkReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The parser class registered as `name`; raises ValueError listing the known names."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown reasoning parser {name!r}; choose one of {sorted(REASONING_PARSERS)}"
        ) from None


__all__ = ["REASONING_PARSERS", "ReasoningDelta", "ReasoningParser", "Start", "get_reasoning_parser"]
