"""The engine's one entry point to structured output: compile, track, and mask a batch.

Who calls what (see docs/structured_output.md):
- front end: `manager.compile(params.structured_outputs)` to validate -> `GrammarError` is a 400;
- engine core: `manager.compile_async(params)` when a request is added (it waits until done, off
  the step loop), then `manager.new_request(params)` (a cache hit) -> its `RequestGrammar`, or,
  for a reasoning model (`reasoning=`), a `ReasoningGate` that holds the grammar back until the
  thinking ends (`reasoning_gate.py`);
- runner, per step: `bitmask = manager.batch_bitmask(grammars)` (row i <-> batch row i), then
  `apply_bitmask(logits, bitmask, rows)` before sampling, and `grammar.accept_token(t)` after.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from tokenmill.sampling_params import ReasoningParams, StructuredOutputsParams
from tokenmill.structured_output.compiler import (
    DEFAULT_MAX_CACHE_BYTES,
    DEFAULT_MAX_CACHE_ENTRIES,
    GrammarCompiler,
    GrammarError,
)
from tokenmill.structured_output.matcher import RequestGrammar
from tokenmill.structured_output.reasoning_gate import ReasoningGate

_ALL_ALLOWED = -1  # int32 with every bit set


class StructuredOutputManager:
    """Compiles specs (cached) and builds the per-step token bitmask for a batch.

    Args:
        tokenizer: the HF tokenizer the model generates with.
        vocab_size: the model's logits width (lm_head rows). It may exceed the tokenizer's
            vocabulary (padded heads); the padded ids are never allowed under a grammar.
        stop_token_ids: the tokens that end a request (EOS and the model's extra stop ids); the
            mask allows exactly these once the grammar's text is complete.
        max_batch_size: rows preallocated in the bitmask buffer (grows if a batch is larger).
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        *,
        stop_token_ids: list[int] | None = None,
        max_batch_size: int = 256,
        compile_threads: int = 2,
        max_cache_entries: int = DEFAULT_MAX_CACHE_ENTRIES,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        pin_memory: bool | None = None,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        if stop_token_ids is not None:
            stop_token_ids = sorted({int(t) for t in stop_token_ids})
        self.tokenizer_info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids
        )
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.compiler = GrammarCompiler(
            self.tokenizer_info,
            max_cache_entries=max_cache_entries,
            max_cache_bytes=max_cache_bytes,
            max_threads=compile_threads,
        )
        # Number of int32 words per row: ceil(vocab / 32).
        self.bitmask_width = xgr.get_bitmask_shape(1, vocab_size)[1]
        if pin_memory is None:
            pin_memory = torch.cuda.is_available()
        self._pin_memory = pin_memory
        self._bitmask = self._allocate(max_batch_size)  # [max_batch, bitmask_width] int32, CPU
        self._bitmask_np = self._bitmask.numpy()  # same memory; see batch_bitmask
        self._executor: ThreadPoolExecutor | None = None

    def _allocate(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, self.bitmask_width), dtype=torch.int32, pin_memory=self._pin_memory)

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Compile (or fetch from cache). Raises `GrammarError`, a `ValueError`, for bad specs."""
        return self.compiler.compile(params)

    def compile_async(self, params: StructuredOutputsParams) -> Future:
        """Compile on a background thread, so the engine's step loop never waits on a slow schema
        (xgrammar releases the GIL while compiling). The future's result is the compiled grammar,
        after which `new_request(params)` is a cache hit; its exception is the `GrammarError`.
        """
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-compile")
        return self._executor.submit(self.compiler.compile, params)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def new_request(
        self,
        params: StructuredOutputsParams | None,
        *,
        reasoning: ReasoningParams | None = None,
        stop_token_ids: list[int] | None = None,
        prefix_token_ids: list[int] | tuple[int, ...] = (),
    ) -> RequestGrammar | ReasoningGate:
        """A fresh grammar state for one request (one per `n` child: each samples its own text).

        Args:
            params: the request's constraint (already validated by `compile` in the front end);
                None only with `reasoning` (a thinking budget alone).
            reasoning: a reasoning model's thinking, which the constraint does not apply to.
            stop_token_ids: this request's stop tokens (EOS + `all_stop_token_ids`), when they differ
                from the manager's; the mask allows exactly these once the text is complete.
            prefix_token_ids: output tokens generated before (a preempted request that resumes):
                replayed so the grammar continues where it was.
        Raises:
            GrammarError: the spec is invalid, or a prefix token breaks it.
        """
        assert params is not None or reasoning is not None
        stops = sorted({int(t) for t in stop_token_ids}) if stop_token_ids is not None else self.stop_token_ids
        grammar = RequestGrammar(self.compile(params), stops) if params is not None else None
        if reasoning is not None:
            grammar = ReasoningGate(grammar, reasoning)
        if prefix_token_ids and grammar.accept_tokens(list(prefix_token_ids)) != len(prefix_token_ids):
            raise GrammarError("the request's earlier output does not follow its grammar")
        return grammar

    def batch_bitmask(self, grammars: list[RequestGrammar | ReasoningGate | None]) -> torch.Tensor | None:
        """The next-token bitmask for a batch, or None when no row has a grammar.

        Args:
            grammars: one entry per logits row (None: unconstrained).
        Returns:
            `[len(grammars), ceil(vocab/32)]` int32 CPU view of a reused (pinned, with CUDA)
            buffer, valid until the next call: `apply_bitmask` copies it to the GPU asynchronously,
            so call this again only after the step's host sync (the sampled tokens' `.tolist()`).
            Rows without a live grammar are all-allowed, so masking every row is correct; pass
            `rows=constrained_rows(grammars)` to `apply_bitmask` to skip them.
        """
        if all(g is None for g in grammars):
            return None
        batch = len(grammars)
        if batch > self._bitmask.shape[0]:
            self._bitmask = self._allocate(max(batch, 2 * self._bitmask.shape[0]))
            self._bitmask_np = self._bitmask.numpy()
        bitmask = self._bitmask[:batch]
        # Default every row to all-allowed, then let the matchers overwrite theirs: a stale row
        # from the last step would cost a wrong token. Through numpy, a single-threaded memset of
        # microseconds; torch's `fill_` wakes its thread pool, measured at ~8 ms on a busy 2-core host.
        self._bitmask_np[:batch].fill(_ALL_ALLOWED)
        # A plain loop: xgrammar caches each state's mask, so a row costs a few microseconds,
        # while `xgr.BatchGrammarMatcher` spends milliseconds on its thread pool per call.
        for row, g in enumerate(grammars):
            if g is not None:
                g.fill_bitmask(bitmask, row)
        return bitmask


def constrained_rows(grammars: list[RequestGrammar | ReasoningGate | None]) -> list[int]:
    """Rows whose logits must be masked (a grammar that has not terminated, or a gate forcing
    the end of the thinking)."""
    return [i for i, g in enumerate(grammars) if g is not None and g.is_constraining()]


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int] | None = None
) -> None:
    """Set disallowed logits to -inf, in place, on CPU or CUDA.

    Args:
        logits: `[batch, model_vocab]` float tensor (any float dtype, CPU or CUDA).
        bitmask: `[batch, ceil(vocab/32)]` int32 from `batch_bitmask` (CPU; copied to the logits'
            device here, asynchronously when it is pinned).
        rows: rows to mask (None: all). Logit columns past the bitmask's coverage (a model head
            wider than the mask's vocabulary) are disallowed in those rows.
    """
    assert logits.dim() == 2 and bitmask.dim() == 2 and bitmask.dtype == torch.int32
    if rows is not None and not rows:
        return
    if bitmask.device != logits.device:
        bitmask = bitmask.to(logits.device, non_blocking=True)
    model_vocab = logits.shape[1]
    covered = min(model_vocab, bitmask.shape[1] * 32)
    if logits.device.type == "cpu":
        _apply_bitmask_cpu(logits, bitmask, covered, rows)
        if model_vocab > covered:
            logits[slice(None) if rows is None else rows, covered:] = float("-inf")
        return
    try:
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=covered, indices=rows)
    except (RuntimeError, ValueError, TypeError, ImportError):
        # e.g. no Triton for this GPU or an unsupported dtype: the same operation in plain torch.
        _apply_bitmask_torch(logits, bitmask, covered, rows)
    if model_vocab > covered:
        index = slice(None) if rows is None else torch.tensor(rows, device=logits.device)
        logits[index, covered:] = float("-inf")


def _apply_bitmask_cpu(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int, rows: list[int] | None) -> None:
    """CPU: unpack the bits with numpy (tens of microseconds) and mask each row with one
    masked_fill. xgrammar's CPU kernel took 3-4 ms for 32 x 49k logits on the 2-core dev machine;
    this takes about 1 ms (measured at batch 32 in `tokenmill bench structured`)."""
    import numpy as np

    words = bitmask.numpy() if rows is None else bitmask.numpy()[rows]
    allowed = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab].view(np.bool_)
    disallowed = torch.from_numpy(~allowed)
    if rows is None:
        logits[:, :vocab].masked_fill_(disallowed, float("-inf"))
    else:
        for i, row in enumerate(rows):
            logits[row, :vocab].masked_fill_(disallowed[i], float("-inf"))


def _apply_bitmask_torch(
    logits: torch.Tensor, bitmask: torch.Tensor, vocab: int, rows: list[int] | None
) -> None:
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    index = torch.arange(logits.shape[0], device=logits.device) if rows is None else torch.tensor(
        rows, device=logits.device
    )
    words = bitmask.index_select(0, index)  # [r, W]
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]  # [r, vocab]
    sub = logits.index_select(0, index)
    sub[:, :vocab].masked_fill_(~allowed, float("-inf"))
    logits.index_copy_(0, index, sub)
