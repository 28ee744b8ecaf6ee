"""Admission by time: how long the work already admitted would delay a new request.

Counting sequences alone admits requests that then take minutes (500 requests on a CPU: a median
latency of 141 s). The engine shares its steps among the running requests (a prompt being
prefilled leaves room for the others, core/scheduler.py), so a new sequence that must compute `W`
tokens (its prompt plus `max_tokens`) finishes only after the engine has also computed, for every
sequence in flight, what that sequence still lacks (prompt not yet computed plus tokens it may
still generate) or `W` of it, whichever is less. That work, over the engine's measured speed, is
the delay the others cause it, its queue wait:

    wait = sum over sequences in flight of min(tokens left, W) / tokens per second

"Tokens left" counts each sequence's `max_tokens` minus what it generated (an upper bound: EOS
often comes first). The speed is prompt plus generated tokens per second of step time, smoothed
over the last few dozen busy steps. Until one step has been measured the wait is 0: a cold server
admits by count only.
"""

from __future__ import annotations

# Weight of the past in the smoothed sums, per step: ~50 steps of memory.
_DECAY = 0.98


class QueueWaitEstimator:
    """The engine's speed, from `on_step`; `wait_s` turns work ahead into seconds."""

    def __init__(self) -> None:
        self._tokens = 0.0  # decayed sums: tokens computed, and the seconds it took
        self._seconds = 0.0

    def on_step(self, step_s: float, num_tokens: int) -> None:
        """One engine step: how long it took and how many tokens (prompt and generated) it computed."""
        if step_s > 0:
            self._tokens = self._tokens * _DECAY + num_tokens
            self._seconds = self._seconds * _DECAY + step_s

    @property
    def tokens_per_s(self) -> float | None:
        return self._tokens / self._seconds if self._tokens > 0 and self._seconds > 0 else None

    def wait_s(self, tokens_ahead: float) -> float:
        rate = self.tokens_per_s
        return tokens_ahead / rate if rate else 0.0
