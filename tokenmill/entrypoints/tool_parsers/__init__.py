"""Tool-call parsers for `tool_choice="auto"`, keyed by the name the server's
`--tool-call-parser` flag takes. One parser instance per response:

    parser = get_tool_parser("hermes")(tools)
    parser.extract_tool_calls(text)                       # non-streaming
    parser.extract_tool_calls_streaming(prev, cur, delta) # streaming, then finish_streaming(cur)
"""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import (
    CallText,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    make_tool_call_id,
)
from tokenmill.entrypoints.tool_parsers.deepseek import DeepSeekV3ToolParser, DeepSeekV31ToolParser
from tokenmill.entrypoints.tool_parsers.hermes import HermesToolParser
from tokenmill.entrypoints.tool_parsers.kimi_k2 import KimiK2ToolParser
from tokenmill.entrypoints.tool_parsers.llama3_json import Llama3JsonToolParser
from tokenmill.entrypoints.tool_parsers.minimax_m2 import MiniMaxM2ToolParser
from tokenmill.entrypoints.tool_parsers.mistral import MistralToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,  # Qwen 2.5 and Qwen3 write the Hermes tags
    "qwen3": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
    "deepseek_v3": DeepSeekV3ToolParser,  # also DeepSeek-R1
    "deepseek_v31": DeepSeekV31ToolParser,  # V3.1 and later
    "kimi_k2": KimiK2ToolParser,
    "minimax_m2": MiniMaxM2ToolParser,
    "mistral": MistralToolParser,
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered as `name`; raises ValueError listing the known names."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r}; choose one of {sorted(TOOL_PARSERS)}"
        ) from None


__all__ = [
    "CallText",
    "DeltaMessage",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "TOOL_PARSERS",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
    "make_tool_call_id",
]
