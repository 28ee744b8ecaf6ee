"""Tool-call parsers for `tool_choice="auto"`, keyed by the name the server's
`--tool-call-parser` flag takes. One parser instance per response:

    parser = get_tool_parser("hermes")()
    parser.extract_tool_calls(text)                       # non-streaming
    parser.extract_tool_calls_streaming(prev, cur, delta) # streaming, then finish_streaming(cur)
"""

from __future__ import annotations

from tokenmill.entrypoints.tool_parsers.base import (
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCalls,
    ToolCall,
    ToolParser,
    make_tool_call_id,
)
from tokenmill.entrypoints.tool_parsers.hermes import HermesToolParser
from tokenmill.entrypoints.tool_parsers.llama3_json import Llama3JsonToolParser

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "qwen": HermesToolParser,  # Qwen 2.5 / 3 use the Hermes tags
    "llama3_json": Llama3JsonToolParser,
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
    "DeltaMessage",
    "DeltaToolCall",
    "ExtractedToolCalls",
    "TOOL_PARSERS",
    "ToolCall",
    "ToolParser",
    "get_tool_parser",
    "make_tool_call_id",
]
