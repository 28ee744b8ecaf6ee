"""A request's grammar behind its reasoning: free while the model thinks, enforced after.

A reasoning model writes its thinking first and its answer after an end sequence (`</think>`).
Constraining the thinking to the answer's schema would stop the model from thinking at all, so
the gate lets every token through until the end sequence has been generated, then hands each
step to the grammar. With a thinking budget, once the thinking has that many tokens the gate
forces the end sequence (one token per step), so a budget also ends the thinking of a model that
would go on.

The gate has the interface the runner uses for a `RequestGrammar` (`fill_bitmask`,
`accept_token`, `is_terminated`, `is_completed`, `is_constraining`), so the runner treats both
alike. States, in order:

    OPENING   the output may open the thinking with `start_token_id` (its first token only);
              the mask is the grammar's plus that token
    THINKING  free (or, over budget, the next token of the end sequence only)
    ANSWER    the grammar's, or free without one
"""

from __future__ import annotations

from enum import IntEnum

import torch

from tokenmill.sampling_params import ReasoningParams
from tokenmill.structured_output.matcher import RequestGrammar


class GateState(IntEnum):
    OPENING = 0
    THINKING = 1
    ANSWER = 2


def _allow_only(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    """Row `row` of an int32 bitmask allows exactly `token_id`."""
    bitmask[row].fill_(0)
    _add(bitmask, row, token_id)


def _add(bitmask: torch.Tensor, row: int, token_id: int) -> None:
    """Also allow `token_id` in row `row` (bit t % 32 of int32 word t // 32)."""
    word = int(bitmask[row, token_id // 32]) & 0xFFFFFFFF
    value = word | (1 << (token_id % 32))
    bitmask[row, token_id // 32] = value - (1 << 32) if value >= 1 << 31 else value


class ReasoningGate:
    """One request's reasoning state in front of its optional grammar.

    Args:
        grammar: the answer's grammar (None: only the thinking budget is enforced).
        params: where the thinking ends, whether it has begun, and its budget.
    """

    __slots__ = ("grammar", "end_token_ids", "start_token_id", "max_tokens", "state",
                 "num_thinking_tokens", "_matched")

    def __init__(self, grammar: RequestGrammar | None, params: ReasoningParams) -> None:
        self.grammar = grammar
        self.end_token_ids = list(params.end_token_ids)
        self.start_token_id = params.start_token_id
        self.max_tokens = params.max_tokens
        self.state = GateState.THINKING if params.start_token_id is None else GateState.OPENING
        self.num_thinking_tokens = 0
        self._matched = 0  # end-sequence tokens at the tail of the thinking so far

    # ----- the runner's interface -----
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into `bitmask[row]`; False when every token is allowed."""
        if self.state == GateState.THINKING:
            if self._over_budget():
                _allow_only(bitmask, row, self.end_token_ids[self._matched])
                return True
            bitmask[row].fill_(-1)
            return False
        if self.grammar is None:
            bitmask[row].fill_(-1)
            return False
        constrained = self.grammar.fill_bitmask(bitmask, row)
        if self.state == GateState.OPENING and constrained:
            _add(bitmask, row, self.start_token_id)
        return constrained

    def accept_token(self, token_id: int) -> bool:
        token_id = int(token_id)
        if self.state == GateState.OPENING:
            if token_id == self.start_token_id:
                self.state = GateState.THINKING
                self.num_thinking_tokens = 1
                return True
            self.state = GateState.ANSWER  # no thinking: the first token is the answer's
        if self.state == GateState.THINKING:
            self.num_thinking_tokens += 1
            self._matched = self._match_after(token_id)
            if self._matched == len(self.end_token_ids):
                self.state = GateState.ANSWER
            return True
        return self.grammar.accept_token(token_id) if self.grammar is not None else True

    def accept_tokens(self, token_ids: list[int]) -> int:
        for i, token_id in enumerate(token_ids):
            if not self.accept_token(token_id):
                return i
        return len(token_ids)

    def is_terminated(self) -> bool:
        return self.state == GateState.ANSWER and self.grammar is not None and self.grammar.is_terminated()

    def is_completed(self) -> bool:
        return self.state == GateState.ANSWER and self.grammar is not None and self.grammar.is_completed()

    def is_constraining(self) -> bool:
        """This step's logits must be masked."""
        if self.state == GateState.THINKING:
            return self._over_budget()
        return self.grammar is not None and self.grammar.is_constraining()

    @property
    def failed(self) -> bool:
        return self.grammar is not None and self.grammar.failed

    # ----- the end sequence -----
    def _over_budget(self) -> bool:
        return self.max_tokens is not None and self.num_thinking_tokens >= self.max_tokens

    def _match_after(self, token_id: int) -> int:
        """End-sequence tokens matched at the tail once `token_id` is appended (the longest prefix
        of the end sequence that is a suffix of the thinking; the sequence is a few tokens long)."""
        end = self.end_token_ids
        k = self._matched
        while True:
            if k < len(end) and end[k] == token_id:
                return k + 1
            if k == 0:
                return 0
            # Fall back to the longest shorter prefix that is still a suffix (a border of end[:k]).
            k = next((j for j in range(k - 1, 0, -1) if end[:j] == end[k - j:k]), 0)

