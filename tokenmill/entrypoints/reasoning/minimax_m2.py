"""MiniMax-M2: its template opens the thinking in the prompt; the model writes thinking then
`</think>` then the answer.

- `minimax_m2`: thinking and answer apart, like every other parser.
- `minimax_m2_append_think`: the thinking stays in the answer, reopened with `<think>` so the
  content reads `<think>...</think>answer`. MiniMax-M2 is trained on conversations that keep
  each turn's thinking, so clients that send the assistant's content back unchanged (most agent
  frameworks drop `reasoning_content`) keep it in the conversation this way.
"""

from __future__ import annotations

from tokenmill.entrypoints.reasoning.base import ReasoningParser, Start


class MiniMaxM2ReasoningParser(ReasoningParser):
    name = "minimax_m2"
    opens_in_prompt = True


class MiniMaxM2AppendThinkReasoningParser(MiniMaxM2ReasoningParser):
    name = "minimax_m2_append_think"

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        if self.start != Start.THINKING:
            return "", text
        stripped = text.lstrip()
        if stripped.startswith(self.start_marker):
            return "", text  # the model reopened it itself
        if not final and self.start_marker.startswith(stripped):
            return "", ""  # it may still be doing so
        return "", self.start_marker + text

    @property
    def keeps_reasoning_in_content(self) -> bool:
        return True
