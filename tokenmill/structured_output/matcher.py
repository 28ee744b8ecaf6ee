"""Per-request grammar state: which tokens may come next, and the tokens accepted so far."""

from __future__ import annotations

import torch
import xgrammar as xgr


class RequestGrammar:
    """One request's position in its grammar (a thin, typed wrapper over `xgr.GrammarMatcher`).

    The life of a constrained request, one decode step at a time:
        fill_bitmask(bitmask, row)   -> the sampler masks row `row` of the logits with it
        accept_token(sampled_id)     -> advance; False means the token broke the grammar
        is_terminated()              -> the grammar accepted a stop token: finish the request

    After the grammar's text is complete, the mask allows only the stop tokens, so the request ends
    with a stop token like an unconstrained one (or with `max_tokens` first, as "length").

    Args:
        compiled: from `GrammarCompiler.compile`.
        stop_token_ids: overrides the tokenizer info's stop tokens (the engine's EOS set).
    """

    __slots__ = ("_matcher", "num_accepted_tokens", "failed")

    def __init__(self, compiled: xgr.CompiledGrammar, stop_token_ids: list[int] | None = None) -> None:
        self._matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids)
        self.num_accepted_tokens = 0
        # Set once a token is refused; the engine finishes such a request rather than guess.
        self.failed = False

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token. Refused tokens leave the state unchanged."""
        if self._matcher.is_terminated():
            return False
        ok = self._matcher.accept_token(int(token_id))
        if ok:
            self.num_accepted_tokens += 1
        else:
            self.failed = True
        return ok

    def accept_tokens(self, token_ids: list[int]) -> int:
        """Accept a run of tokens (speculative / multi-token steps); returns how many were taken."""
        for i, token_id in enumerate(token_ids):
            if not self.accept_token(token_id):
                return i
        return len(token_ids)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens (rejected speculative tokens, preemption)."""
        assert 0 <= num_tokens <= self.num_accepted_tokens, (num_tokens, self.num_accepted_tokens)
        if num_tokens:
            self._matcher.rollback(num_tokens)
            self.num_accepted_tokens -= num_tokens
            self.failed = False

    def reset(self) -> None:
        """Back to the start (a preempted request that recomputes from its prompt keeps its output
        tokens, so it does not need this; a discarded output does)."""
        self._matcher.reset()
        self.num_accepted_tokens = 0
        self.failed = False

    def is_terminated(self) -> bool:
        return self._matcher.is_terminated()

    def is_constraining(self) -> bool:
        """This step's logits must be masked (the grammar has not accepted a stop token yet)."""
        return not self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """The text so far is a complete match (only stop tokens may follow)."""
        return self._matcher.is_completed()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed-next-token bits into `bitmask[row]` (int32, CPU).

        Returns False when the row allows every token (no need to apply it). A terminated grammar
        has no next token; its row is set to all-allowed so a late step cannot produce all -inf.
        """
        if self._matcher.is_terminated():
            bitmask[row].fill_(-1)
            return False
        return self._matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def matcher(self) -> xgr.GrammarMatcher:
        """The xgrammar matcher, for batched calls (`xgr.BatchGrammarMatcher`)."""
        return self._matcher

    @property
    def stop_token_ids(self) -> list[int]:
        return list(self._matcher.stop_token_ids)
