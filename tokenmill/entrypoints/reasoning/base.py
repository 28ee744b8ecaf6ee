"""What every reasoning parser does: split a reasoning model's output into its thinking and its
answer, whole or streamed.

Reasoning models write their thinking between markers (`<think>` ... `</think>`) before the
answer. Where the output starts depends on the prompt the chat template wrote, so a parser is
built for one response from that prompt (`for_prompt`):

- the prompt ends with the end marker (thinking switched off, e.g. Qwen3's
  `enable_thinking=False` renders `<think>\\n\\n</think>\\n\\n`): the whole output is the answer;
- the prompt ends with the start marker (DeepSeek-R1, MiniMax-M2, Qwen3-Thinking templates open
  the thinking themselves): the output starts inside the thinking;
- otherwise the output thinks only if it opens with the start marker (Qwen3's hybrid template,
  Kimi-K2), unless the family always thinks (`opens_in_prompt`).

The thinking is returned without the whitespace around it and the answer without the
whitespace that separates it from the thinking (`</think>\n\n`), as the templates write them
back. Streaming works like the tool parsers: `stream(text, final)` is given the whole text so far and
returns what is new; text that may still become a marker is held back until it is decided, so
the pieces add up to `extract_reasoning(text)` however the text arrives in chunks.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from tokenmill.entrypoints.tool_parsers.base import held_suffix


class Start(IntEnum):
    """Where the output begins."""

    ANSWER = 0  # the prompt closed the thinking
    UNDECIDED = 1  # the output may open the thinking with the start marker
    THINKING = 2  # the prompt opened the thinking


@dataclass(slots=True)
class ReasoningDelta:
    reasoning: str | None = None
    content: str | None = None


class ReasoningParser:
    """Splits one response. Subclasses set the markers and the family's habits."""

    name: str = ""
    start_marker: str = "<think>"
    end_marker: str = "</think>"
    # Text that ends the thinking without the end marker and belongs to the answer (Kimi-K2 opens
    # its tool-call section straight from the thinking).
    implicit_ends: tuple[str, ...] = ()
    # The family's templates open the thinking in the prompt: output before the end marker is
    # thinking even when the prompt's tail does not show the start marker.
    opens_in_prompt: bool = False

    def __init__(self, start: Start = Start.UNDECIDED) -> None:
        self.start = start
        self._sent_reasoning = 0
        self._sent_content = 0

    @classmethod
    def start_for_prompt(cls, prompt: str | None) -> Start:
        tail = (prompt or "").rstrip()
        if tail.endswith(cls.end_marker):
            return Start.ANSWER
        if tail.endswith(cls.start_marker):
            return Start.THINKING
        return Start.THINKING if cls.opens_in_prompt else Start.UNDECIDED

    @classmethod
    def for_prompt(cls, prompt: str | None) -> "ReasoningParser":
        """The parser for a response to `prompt` (the text the chat template rendered)."""
        return cls(cls.start_for_prompt(prompt))

    @property
    def markers(self) -> tuple[str, ...]:
        return (self.start_marker, self.end_marker, *self.implicit_ends)

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(thinking, answer) of `text`; with `final=False` only what is decided so far."""
        if self.start == Start.ANSWER:
            return "", text
        stripped = text.lstrip()
        if stripped.startswith(self.start_marker):
            body = text[len(text) - len(stripped) + len(self.start_marker):]
        elif not final and self.start_marker.startswith(stripped):
            return "", ""  # the output may still be opening its thinking
        elif self.start == Start.THINKING:
            body = text
        else:
            return "", text  # it answered without thinking
        cut = None
        end = body.find(self.end_marker)
        if end >= 0:
            cut = (end, end + len(self.end_marker))
        for marker in self.implicit_ends:
            at = body.find(marker)
            if at >= 0 and (cut is None or at < cut[0]):
                cut = (at, at)  # the marker stays in the answer (a tool parser reads it)
        if cut is not None:
            return body[:cut[0]].strip(), body[cut[1]:].lstrip()
        # Text that may still become a marker is held back; whitespace at either end of the
        # thinking is layout (`<think>\n...\n</think>`), and stripping it keeps what was sent a
        # prefix of what follows (trailing whitespace is sent once text comes after it).
        held = 0 if final else held_suffix(body, self.end_marker, *self.implicit_ends)
        return body[: len(body) - held].strip(), ""

    def extract_reasoning(self, text: str) -> tuple[str | None, str | None]:
        """(thinking or None, answer or None) of a finished output."""
        reasoning, content = self.split(text, final=True)
        return reasoning or None, content or None

    def stream(self, text: str, final: bool = False) -> ReasoningDelta | None:
        """What is new in the whole `text` so far (None: nothing yet); `final` flushes what was
        held back."""
        reasoning, content = self.split(text, final)
        delta = ReasoningDelta()
        if len(reasoning) > self._sent_reasoning:
            delta.reasoning = reasoning[self._sent_reasoning:]
            self._sent_reasoning = len(reasoning)
        if len(content) > self._sent_content:
            delta.content = content[self._sent_content:]
            self._sent_content = len(content)
        if delta.reasoning is None and delta.content is None:
            return None
        return delta

    @property
    def keeps_reasoning_in_content(self) -> bool:
        """The answer carries the thinking itself (`minimax_m2_append_think`)."""
        return False
