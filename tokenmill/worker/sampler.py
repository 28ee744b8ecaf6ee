"""The batched sampler: one pass over a [batch, vocab] logits tensor for every request in the step.

Order of operations (vLLM's): logit bias and min-tokens suppression, then penalties, then greedy
argmax or temperature -> top-k -> top-p -> min-p -> sample. Log-probabilities are reported from the
raw model distribution, before any of that processing. Sampling uses the exponential-race trick
(argmax of p / Exp(1) noise), so a request with a `seed` draws its noise from its own generator
and gets the same tokens whatever else is in the batch.

`Sampler.sample` leaves its results on the device (no host sync), so the runner can launch the next
step before they are read; `SampledTokens.to_host` then starts the copies and `result` waits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.core.messages import TokenLogprobs
from tokenmill.ops import cpu_argmax
from tokenmill.utils.transfer import index_tensor, to_device

_NEG_INF = float("-inf")
_GREEDY_BELOW = 1e-5  # a temperature below this means greedy
_TRITON_ARGMAX_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(slots=True)
class SamplingBatch:
    """Per-row sampling inputs for one step (rows = requests that sample this step)."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    generators: list[torch.Generator | None]
    num_logprobs: list[int | None]
    # Sparse extras, only for the rows that use them.
    logit_bias: dict[int, dict[int, float]] = field(default_factory=dict)
    suppressed_tokens: dict[int, list[int]] = field(default_factory=dict)  # min_tokens not reached
    penalties: dict[int, tuple[float, float, float]] = field(default_factory=dict)  # rep, pres, freq
    prompt_token_ids: dict[int, list[int]] = field(default_factory=dict)  # for repetition penalty
    output_token_ids: dict[int, list[int]] = field(default_factory=dict)  # for all penalties
    # Structured outputs: xgrammar's packed token bitmask [B, ceil(V/32)] int32 and the rows it constrains.
    grammar_bitmask: torch.Tensor | None = None
    grammar_rows: list[int] = field(default_factory=list)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass(slots=True)
class LogprobTensors:
    """`batch_token_logprobs`'s numbers before they become Python lists (device, then host)."""

    chosen: torch.Tensor  # [R] the chosen tokens' log-probabilities
    ranks: torch.Tensor  # [R]
    top: list[tuple[list[int], torch.Tensor, torch.Tensor]]  # (member rows, values [m, k], ids [m, k])

    def to_host(self) -> "LogprobTensors":
        """Start the device-to-host copies (pinned, non-blocking); read after the step's event."""
        cpu = lambda t: t.to("cpu", non_blocking=True)  # noqa: E731
        return LogprobTensors(cpu(self.chosen), cpu(self.ranks), [(m, cpu(v), cpu(i)) for m, v, i in self.top])

    def tolist(self, token_ids: list[int]) -> list[TokenLogprobs]:
        results = [TokenLogprobs([t], [c], [r])
                   for t, c, r in zip(token_ids, self.chosen.tolist(), self.ranks.tolist())]
        for members, values, indices in self.top:
            k = values.shape[1]
            for j, top_values, top_ids in zip(members, values.tolist(), indices.tolist()):
                results[j].token_ids += top_ids
                results[j].logprobs += top_values
                results[j].ranks += range(1, k + 1)
        return results


@dataclass(slots=True)
class SampledTokens:
    """One step's sampled tokens (and logprobs), on the device until `to_host`."""

    token_ids: torch.Tensor  # [B] int64
    num_rows: int
    logprob_rows: list[int] = field(default_factory=list)  # rows that asked for logprobs
    logprobs: LogprobTensors | None = None

    def to_host(self) -> "SampledTokens":
        if self.token_ids.device.type == "cpu":
            return self
        return SampledTokens(self.token_ids.to("cpu", non_blocking=True), self.num_rows, self.logprob_rows,
                             self.logprobs.to_host() if self.logprobs is not None else None)

    def result(self) -> SamplerOutput:
        """Python lists (a host sync unless `to_host` ran and its copies are done)."""
        token_list = self.token_ids.tolist()
        logprobs: list[TokenLogprobs | None] = [None] * self.num_rows
        if self.logprobs is not None:
            rows = self.logprob_rows
            for i, lp in zip(rows, self.logprobs.tolist([token_list[i] for i in rows])):
                logprobs[i] = lp
        return SamplerOutput(token_list, logprobs)


class Sampler:
    """The batched sampler for one device; its argmax kernel is chosen once, here."""

    def __init__(self, device: torch.device = torch.device("cpu"), native_argmax: bool = False) -> None:
        """`native_argmax` (CPU): greedy picks through the C++ kernel where it builds here."""
        if device.type == "cuda":
            from tokenmill.ops.argmax import argmax_rows
            self.argmax = _triton_argmax(argmax_rows)
        elif native_argmax and cpu_argmax.available():
            self.argmax = cpu_argmax.argmax
        else:
            self.argmax = _torch_argmax

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V] float32 (modified in place)."""
        return self.sample(logits, batch).result()

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampledTokens:
        """Like calling the sampler, without waiting for the results on the host."""
        num_rows = logits.shape[0]
        # Per-row Python is what a large batch pays every step: whole-batch questions are answered
        # with C-level list methods (count, max, min) rather than generator expressions.
        want_logprobs = batch.num_logprobs.count(None) != num_rows
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

        if batch.logit_bias or batch.suppressed_tokens:
            self._apply_bias_and_suppression(logits, batch)
        if batch.penalties:
            self._apply_penalties(logits, batch)
        if batch.grammar_bitmask is not None and batch.grammar_rows:
            from tokenmill.structured_output import apply_bitmask
            apply_bitmask(logits, batch.grammar_bitmask, batch.grammar_rows)

        if max(batch.temperature) < _GREEDY_BELOW:
            tokens = self.argmax(logits)
        else:
            tokens = self._sample(logits, batch)
        out = SampledTokens(tokens, num_rows)
        if raw_logprobs is not None:
            rows = [i for i, k in enumerate(batch.num_logprobs) if k is not None]
            chosen = tokens if len(rows) == num_rows else tokens.index_select(0, index_tensor(rows, tokens.device))
            out.logprob_rows = rows
            out.logprobs = token_logprob_tensors(raw_logprobs, rows, chosen, [batch.num_logprobs[i] for i in rows])
        return out

    @staticmethod
    def _apply_bias_and_suppression(logits: torch.Tensor, batch: SamplingBatch) -> None:
        vocab = logits.shape[1]
        for row, bias in batch.logit_bias.items():
            ids = [t for t in bias if t < vocab]
            if ids:
                logits[row, ids] += to_device([bias[t] for t in ids], logits.dtype, logits.device)
        for row, ids in batch.suppressed_tokens.items():
            ids = [t for t in ids if t < vocab]
            if ids:
                logits[row, ids] = _NEG_INF

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
        vocab = logits.shape[1]
        for row, (rep, pres, freq) in batch.penalties.items():
            out_ids = index_tensor(batch.output_token_ids.get(row, []), logits.device)
            counts = torch.zeros(vocab, dtype=logits.dtype, device=logits.device)
            if out_ids.numel():
                counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
            if rep != 1.0:
                seen = counts > 0
                prompt = batch.prompt_token_ids.get(row)
                if prompt:
                    seen[index_tensor(prompt, logits.device)] = True
                row_logits = logits[row]
                penalised = torch.where(row_logits > 0, row_logits / rep, row_logits * rep)
                logits[row] = torch.where(seen, penalised, row_logits)
            if freq:
                logits[row] -= freq * counts
            if pres:
                logits[row] -= pres * (counts > 0).to(logits.dtype)

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        device = logits.device
        temperatures = batch.temperature
        greedy_rows = ([i for i, t in enumerate(temperatures) if t < _GREEDY_BELOW]
                       if min(temperatures) < _GREEDY_BELOW else [])
        greedy_tokens = self.argmax(logits) if greedy_rows else None
        if greedy_rows:
            temperatures = [t if t >= _GREEDY_BELOW else 1.0 for t in temperatures]
        logits.div_(per_row_tensor(temperatures, logits.dtype, device).unsqueeze(1))
        if max(batch.top_k) > 0 or min(batch.top_p) < 1.0:
            apply_top_k_top_p(logits, batch.top_k, batch.top_p)
        if max(batch.min_p) > 0:
            min_p = per_row_tensor(batch.min_p, logits.dtype, device).unsqueeze(1)
            probs = torch.softmax(logits, dim=-1)
            threshold = probs.max(dim=-1, keepdim=True).values * min_p
            logits.masked_fill_(probs < threshold, _NEG_INF)
        probs = torch.softmax(logits, dim=-1)
        noise = torch.empty_like(probs)
        generators = batch.generators
        num_unseeded = generators.count(None)
        if num_unseeded:
            noise.exponential_()
        if num_unseeded < len(generators):
            for i, g in enumerate(generators):
                if g is not None:
                    noise[i].exponential_(generator=g)
        tokens = self.argmax(probs.div_(noise))
        if greedy_rows:
            rows = index_tensor(greedy_rows, device)
            tokens[rows] = greedy_tokens[rows]
        return tokens


def _torch_argmax(logits: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def _triton_argmax(argmax_rows):
    """`logits.argmax(dim=-1)` over the vocab ([B, V] -> int64 [B]), the same indices bit for bit,
    by a two-launch Triton kernel (`ops/argmax.py`) where it applies: torch's reduction runs a
    vocab-sized row on one block, 27 us per step at batch 1 on the H200."""
    def argmax(logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() == 2 and logits.stride(1) == 1 and logits.dtype in _TRITON_ARGMAX_DTYPES:
            return argmax_rows(logits)
        return logits.argmax(dim=-1)
    return argmax


def per_row_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[B] tensor of per-row parameters. When every row has the same value (the usual case) it is
    filled on the device: no list-to-tensor build and no copy at all."""
    if values.count(values[0]) == len(values):
        return torch.full((len(values),), values[0], dtype=dtype, device=device)
    return to_device(values, dtype, device)


def apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> None:
    """Mask (in place) everything outside each row's top-k and top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    device = logits.device
    k = per_row_tensor([kk if kk > 0 else vocab for kk in top_k], torch.long, device)
    positions = torch.arange(vocab, device=device).unsqueeze(0)
    remove = positions >= k.unsqueeze(1)
    p = per_row_tensor(top_p, logits.dtype, device).unsqueeze(1)
    sorted_logits.masked_fill_(remove, _NEG_INF)
    probs = torch.softmax(sorted_logits, dim=-1)
    # Drop a token when the mass strictly before it already reaches p (the top token always stays).
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= mass_before >= p
    remove[:, 0] = False
    logits.scatter_(1, order, sorted_logits.masked_fill(remove, _NEG_INF))


def token_logprob_tensors(logprobs: torch.Tensor, rows: list[int], token_ids: torch.Tensor,
                          ks: list[int]) -> LogprobTensors:
    """The chosen tokens' log-probabilities and ranks, and each row's top-k, left on the device.

    Args:
        logprobs: [N, V] log-softmax.
        rows: which rows of `logprobs` to report, each with its chosen token (`token_ids` [R], on
            the device) and top-k size.
    """
    device = logprobs.device
    if rows != list(range(logprobs.shape[0])):
        logprobs = logprobs.index_select(0, index_tensor(rows, device))  # [R, V]
    chosen = logprobs.gather(1, token_ids.view(-1, 1))  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top = []
    for k in sorted(set(ks)):
        if k <= 0:
            continue
        members = [j for j, kk in enumerate(ks) if kk == k]
        selected = logprobs if len(members) == len(rows) else logprobs.index_select(0, index_tensor(members, device))
        values, indices = selected.topk(k)
        top.append((members, values, indices))
    return LogprobTensors(chosen.view(-1), ranks, top)


def batch_token_logprobs(logprobs: torch.Tensor, rows: list[int], token_ids: list[int],
                         ks: list[int]) -> list[TokenLogprobs]:
    """`token_logprobs` for many rows at once: a handful of host syncs in all instead of three
    per row."""
    if not rows:
        return []
    tensors = token_logprob_tensors(logprobs, rows, index_tensor(token_ids, logprobs.device), ks)
    return tensors.tolist(token_ids)


def token_logprobs(row_logprobs: torch.Tensor, token_id: int, k: int) -> TokenLogprobs:
    """The chosen token's log-probability and rank, then the top-k (row: [V] log-softmax)."""
    return batch_token_logprobs(row_logprobs.unsqueeze(0), [0], [token_id], [k])[0]
