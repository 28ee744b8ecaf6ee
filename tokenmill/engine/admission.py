"""Admission by time: how long the work already admitted would delay a new request.

Counting sequences alone admits requests that then take minutes (500 requests on a CPU: a median
latency of 141 s). The engine shares its steps among the running requests (a prompt being
prefilled leaves room for the others, core/scheduler.py), so a new sequence that must compute `W`
tokens (its prompt plus `max_tokens`) finishes only after the engine has also computed, for every
sequence in flight, what that sequence still lacks (prompt not yet computed plus tokens it may
still generate) or `W` of it, whichever is less. That work, at the engine's measured cost per
token, is the delay the others cause it, its queue wait.

"Tokens left" counts each sequence's `max_tokens` minus what it generated (an upper bound: EOS
often comes first). The cost of a token depends on how many share its step: a step costs a fixed
`a` (weights read once, launches, Python) plus `b` per token, so a batch of 64 decodes costs far
less per token than one decode alone. `a` and `b` are a least-squares line through the recent busy
steps (time against tokens computed, smoothed over the last few dozen). Decode tokens ahead are
priced at the batch they will run in (the sequences in flight, up to `max_num_seqs`), prompt
tokens at a full step (`max_step_tokens`). Until steps of quite different sizes have been seen
the line is unknown and every token is priced at the average seen (pessimistic for batches). Until
one step has been measured the wait is 0: a cold server admits by count only.
"""

from __future__ import annotations

# Weight of the past in the smoothed sums, per step: ~50 steps of memory.
_DECAY = 0.98
# Tokens the largest step seen must have before the per-token slope is believed.
_MIN_SPREAD = 16


class QueueWaitEstimator:
    """Step cost `a + b * tokens`, fitted from `on_step`; `wait_s` turns work ahead into seconds.

    Args:
        max_num_seqs: sequences one step may hold (the batch decode tokens ahead run in).
        max_step_tokens: tokens one step may compute (a prompt chunk); None: the largest step seen.
    """

    def __init__(self, max_num_seqs: int = 1, max_step_tokens: int | None = None) -> None:
        self.max_num_seqs = max(1, max_num_seqs)
        self.max_step_tokens = max_step_tokens
        self._largest_step = 0
        # Decayed sums over steps: weight, tokens n, seconds t, n*n, n*t.
        self._w = self._n = self._t = self._nn = self._nt = 0.0

    def on_step(self, step_s: float, num_tokens: int) -> None:
        """One engine step: how long it took and how many tokens (prompt and generated) it computed."""
        if step_s <= 0 or num_tokens <= 0:
            return
        d = _DECAY
        self._w = self._w * d + 1
        self._n = self._n * d + num_tokens
        self._t = self._t * d + step_s
        self._nn = self._nn * d + num_tokens * num_tokens
        self._nt = self._nt * d + num_tokens * step_s
        self._largest_step = max(self._largest_step, num_tokens)

    def step_cost(self) -> tuple[float, float] | None:
        """(a, b): seconds per step and per token; None until a step was measured."""
        if self._w == 0:
            return None
        mean_n, mean_t = self._n / self._w, self._t / self._w
        var_n = self._nn / self._w - mean_n * mean_n
        if var_n < 1.0 or self._largest_step < _MIN_SPREAD:
            # Only small steps seen (a warm-up request): the slope between a 1- and a 3-token step
            # is noise, and a wrong slope is off by the batch size. Price every token at the
            # average instead, which overcharges batches until one has been seen.
            return 0.0, mean_t / mean_n
        b = (self._nt / self._w - mean_n * mean_t) / var_n
        a = mean_t - b * mean_n
        if b < 0:  # noise: bigger steps were not slower
            return mean_t, 0.0
        if a < 0:
            return 0.0, mean_t / mean_n
        return a, b

    def seconds_per_token(self, tokens_per_step: int) -> float | None:
        cost = self.step_cost()
        if cost is None:
            return None
        a, b = cost
        n = max(1, tokens_per_step)
        return (a + b * n) / n

    @property
    def tokens_per_s(self) -> float | None:
        """Speed at the average step seen."""
        per_token = self.seconds_per_token(round(self._n / self._w)) if self._w else None
        return 1 / per_token if per_token else None

    def wait_s(self, prompt_tokens_ahead: float, decode_tokens_ahead: float, num_seqs: int) -> float:
        """Seconds the engine needs for the work ahead: prompt tokens in full steps, decode tokens
        in a batch of `num_seqs` sequences (capped at `max_num_seqs`)."""
        full_step = self.max_step_tokens or self._largest_step
        prefill = self.seconds_per_token(full_step)
        decode = self.seconds_per_token(min(max(1, num_seqs), self.max_num_seqs))
        if prefill is None or decode is None:
            return 0.0
        return prompt_tokens_ahead * prefill + decode_tokens_ahead * decode
