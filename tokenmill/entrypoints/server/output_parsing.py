"""From a response's text to what the APIs return: thinking, answer text and tool calls.

The server has at most one reasoning parser (`--reasoning-parser`) and one tool-call parser
(`--tool-call-parser`); `ServerParsers` holds them with what they need from the tokenizer, built
once. Each response gets an `OutputParser`: the reasoning parser takes the thinking off the
front of the text, and the tool parser reads calls from the answer that follows, so a model may
think before it calls a tool. Streaming feeds it text as it arrives (`feed`, then `finish`); the
deltas add up to `parse` of the whole text.

The engine is told where the thinking ends (`SamplingParams.reasoning`), so a grammar
(`response_format`, a forced `tool_choice`) constrains only the answer and a thinking budget can
end the thinking.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from tokenmill.entrypoints.reasoning import ReasoningParser, Start, get_reasoning_parser
from tokenmill.entrypoints.tool_parsers import DeltaToolCall, ToolCall, ToolParser, get_tool_parser
from tokenmill.sampling_params import ReasoningParams


@dataclass(slots=True)
class ParsedOutput:
    reasoning: str | None
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)


@dataclass(slots=True)
class OutputDelta:
    reasoning: str | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class OutputParser:
    """One response (one choice): thinking first, then answer text and tool calls.

    Args:
        reasoning: this response's reasoning parser, or None (the text is all answer).
        tools: this response's tool parser, or None (the answer is all content).
    """

    def __init__(self, reasoning: ReasoningParser | None = None, tools: ToolParser | None = None) -> None:
        self.reasoning = reasoning
        self.tools = tools
        self._text = ""
        self._answer = ""  # the answer text so far, as fed to the tool parser
        self.called_tools = False

    def parse(self, text: str) -> ParsedOutput:
        reasoning, answer = self.reasoning.extract_reasoning(text) if self.reasoning else (None, text)
        if self.tools is None:
            return ParsedOutput(reasoning, answer or None)
        result = self.tools.extract_tool_calls(answer or "")
        self.called_tools = result.tools_called
        return ParsedOutput(reasoning, result.content, result.tool_calls)

    def feed(self, delta_text: str) -> OutputDelta:
        self._text += delta_text
        return self._advance(final=False)

    def finish(self) -> OutputDelta:
        return self._advance(final=True)

    def _advance(self, final: bool) -> OutputDelta:
        out = OutputDelta()
        if self.reasoning is not None:
            piece = self.reasoning.stream(self._text, final)
            out.reasoning = piece.reasoning if piece else None
            new_answer = piece.content if piece and piece.content else ""
        else:
            new_answer = self._text[len(self._answer):]
        previous = self._answer
        self._answer += new_answer
        if self.tools is None:
            out.content = new_answer or None
            return out
        parts = []
        if new_answer:
            parts.append(self.tools.extract_tool_calls_streaming(previous, self._answer, new_answer))
        if final:
            parts.append(self.tools.finish_streaming(self._answer))
        content = "".join(p.content for p in parts if p is not None and p.content)
        out.content = content or None
        out.tool_calls = merge_tool_deltas([t for p in parts if p is not None for t in p.tool_calls])
        self.called_tools = self.called_tools or bool(out.tool_calls)
        return out


def merge_tool_deltas(pieces: list[DeltaToolCall]) -> list[DeltaToolCall]:
    """One entry per call index (OpenAI clients expect each index once per chunk): a call's id
    and name with its argument fragments joined, in the order the calls first appear."""
    merged: dict[int, DeltaToolCall] = {}
    for piece in pieces:
        into = merged.get(piece.index)
        if into is None:
            merged[piece.index] = DeltaToolCall(piece.index, piece.id, piece.name, piece.arguments)
            continue
        into.id = into.id or piece.id
        into.name = into.name or piece.name
        if piece.arguments:
            into.arguments = (into.arguments or "") + piece.arguments
    return list(merged.values())


class ServerParsers:
    """The server's parsers and what they need from its tokenizer, built once.

    Args:
        tokenizer: the engine's tokenizer (for the thinking markers' token ids, and whether a
            marker is a special token that detokenizing would drop).
        tool_parser: `--tool-call-parser` (None: `tool_choice="auto"` is refused).
        reasoning_parser: `--reasoning-parser` (None: the text is all answer).
    """

    def __init__(self, tokenizer: Any, tool_parser: str | None = None,
                 reasoning_parser: str | None = None) -> None:
        self.tool_parser: type[ToolParser] | None = get_tool_parser(tool_parser) if tool_parser else None
        self.reasoning: type[ReasoningParser] | None = (
            get_reasoning_parser(reasoning_parser) if reasoning_parser else None)
        special = set(getattr(tokenizer, "all_special_tokens", None) or ())
        self._special_tool_markers = bool(self.tool_parser and special & set(self.tool_parser.markers))
        self._special_reasoning_markers = bool(
            self.reasoning and special & {self.reasoning.start_marker, self.reasoning.end_marker,
                                          *self.reasoning.implicit_ends})
        self._end_ids: list[int] = []
        self._start_id: int | None = None
        if self.reasoning is not None and tokenizer is not None:
            self._end_ids = list(tokenizer.encode(self.reasoning.end_marker, add_special_tokens=False))
            start = list(tokenizer.encode(self.reasoning.start_marker, add_special_tokens=False))
            self._start_id = start[0] if len(start) == 1 else None

    def reasoning_start(self, prompt: str | None) -> Start | None:
        """Where a response to `prompt` begins (None: no reasoning parser)."""
        return self.reasoning.start_for_prompt(prompt) if self.reasoning is not None else None

    def reasoning_params(self, start: Start | None, budget: int | None = None) -> ReasoningParams | None:
        """What the engine needs to keep a grammar off the thinking (None: nothing to keep off).
        A response that may or may not think is told the start marker's token, when it is one
        token; otherwise the grammar applies from the first token."""
        if start is None or start == Start.ANSWER or not self._end_ids:
            return None
        if start == Start.UNDECIDED:
            if self._start_id is None:
                return None
            return ReasoningParams(self._end_ids, start_token_id=self._start_id, max_tokens=budget)
        return ReasoningParams(self._end_ids, max_tokens=budget)

    def reasoning_token_count(self, token_ids: list[int], start: Start | None) -> int:
        """Output tokens up to and including the end of the thinking (all of them when it never
        ended)."""
        end = self._end_ids
        if start is None or start == Start.ANSWER or not end:
            return 0
        for i in range(len(token_ids) - len(end) + 1):
            if token_ids[i:i + len(end)] == end:
                return i + len(end)
        return len(token_ids)

    def keeps_special_tokens(self, tools_active: bool) -> bool:
        """The response's text must keep special tokens: a marker the parsers read is one."""
        return self._special_reasoning_markers or (tools_active and self._special_tool_markers)

    def output_parser(self, start: Start | None, make_tool_parser: Callable[[], ToolParser] | None) -> OutputParser:
        return OutputParser(self.reasoning(start) if self.reasoning is not None and start is not None else None,
                            make_tool_parser() if make_tool_parser is not None else None)
