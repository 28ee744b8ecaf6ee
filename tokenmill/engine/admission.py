"""Admission by time: how long a new request would wait before the engine has started on it.

Counting sequences alone admits a request that then waits minutes (500 requests on a CPU: a
median of 141 s). `QueueWaitEstimator` projects the wait from two measured speeds, smoothed over
the last few dozen busy steps:

- prefill: prompt tokens computed per second of step time. Every prompt token admitted before
  this one and not yet computed is work ahead of it, and so is its own prompt.
- slots: sequences finished per second of step time. Once `max_num_seqs` sequences are in the
  batch, each sequence beyond that waits for one to finish.

    wait = (prompt tokens ahead + its own) / prefill rate + (sequences over max_num_seqs) / finish rate

Until a speed has been measured its term is 0: a cold server admits by count only.
"""

from __future__ import annotations

from dataclasses import dataclass

# Weight of the past in the smoothed sums, per step: ~50 steps of memory.
_DECAY = 0.98


@dataclass(slots=True)
class _Rate:
    """Events per second of busy time, as a ratio of two exponentially decayed sums."""

    events: float = 0.0
    seconds: float = 0.0

    def add(self, events: float, seconds: float) -> None:
        self.events = self.events * _DECAY + events
        self.seconds = self.seconds * _DECAY + seconds

    @property
    def per_second(self) -> float | None:
        return self.events / self.seconds if self.events > 0 and self.seconds > 0 else None


class QueueWaitEstimator:
    """Fed by the output loop (`on_step`) and by admission (`add_prefill` / `remove_prefill`)."""

    def __init__(self, max_num_seqs: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.pending_prefill_tokens = 0  # prompt tokens of admitted requests not yet started
        self._prefill = _Rate()
        self._finish = _Rate()

    def on_step(self, step_s: float, num_prompt_tokens: int, num_finished_seqs: int) -> None:
        """One engine step: how long it took, prompt tokens it computed, sequences it finished."""
        if step_s <= 0:
            return
        if num_prompt_tokens:
            self._prefill.add(num_prompt_tokens, step_s)
        self._finish.add(num_finished_seqs, step_s)

    def add_prefill(self, num_tokens: int) -> None:
        self.pending_prefill_tokens += num_tokens

    def remove_prefill(self, num_tokens: int) -> None:
        self.pending_prefill_tokens = max(0, self.pending_prefill_tokens - num_tokens)

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self._prefill.per_second

    @property
    def finished_seqs_per_s(self) -> float | None:
        return self._finish.per_second

    def projected_wait_s(self, num_prompt_tokens: int, num_seqs: int, num_inflight_seqs: int) -> float:
        """Seconds until a request of `num_seqs` sequences with this prompt is started, given the
        sequences already in flight (not counting its own)."""
        wait = 0.0
        prefill = self.prefill_tokens_per_s
        if prefill:
            wait += (self.pending_prefill_tokens + num_prompt_tokens * num_seqs) / prefill
        over = num_inflight_seqs + num_seqs - self.max_num_seqs
        finish = self.finished_seqs_per_s
        if over > 0 and finish:
            wait += over / finish
        return wait
