"""All-reduce, residual add and RMSNorm in one kernel, over symmetric memory.

In tensor-parallel decode every attention and MLP block ends in a row-parallel projection whose
partial sums are all-reduced and then, at once, added to the residual stream and normalised for
the next block. Done one after the other that is two launches per block (the one-shot all-reduce,
then the fused add + RMSNorm), 160 of each per token of Llama-3.1-70B, each a few microseconds of
mostly latency. This kernel does all of it in one launch, one program per token row.

**Push, with the flag in every word.** Each rank writes its partial row straight into every peer's
symmetric buffer, as 8-byte words that carry 4 bytes of data and a 4-byte call number (NCCL's "LL"
protocol). A receiver polls its own, local copy until every word of every peer's row carries the
current call number. No fence, no separate flag and no read across NVLink: the only latency is one
one-way trip of the stores. An 8-byte store is never torn, so a word whose call number matches
holds this call's data.

The call number of each (slot, row) is a counter in local memory that the row's program bumps; all
ranks make the same calls with the same row counts (tensor-parallel ranks running one model on
one schedule), so their counters agree, and a stale word (an earlier call's number) never matches.

Then every rank sums the rows in rank order, in float32, so all ranks compute bit-identical
results, as the replicated residual stream requires; the sum is rounded to the model dtype, as the
separate all-reduce would leave it; and it adds the residual and normalises with
`ops/rms_norm.py`'s own code.

**Buffer reuse.** Calls alternate two slots (`distributed/symm_mem.py` assigns them), each with a
region per sending rank. A rank writes a peer's region of slot s again only two calls later, after
it has received that peer's rows of the other slot, which the peer sends only once its previous
kernel (the one reading slot s) has finished. So nothing is overwritten while it is still read.

The buffers and the slot assignment belong to the communicator (`distributed/symm_mem.py`); the
RMSNorm layer calls this kernel for a sum the communicator deferred to it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.distributed.symm_mem import FUSED_NUM_SLOTS as NUM_SLOTS  # noqa: F401 (sizes the callers' buffers)
from tokenmill.ops.rms_norm import rms_norm_store


@triton.jit
def _words_to_float(words, DTYPE: tl.constexpr, PER_WORD: tl.constexpr, BLOCK: tl.constexpr):
    """int32 words of packed elements -> the elements as float32, in order ([BLOCK])."""
    if PER_WORD == 1:
        values = words.to(DTYPE, bitcast=True).to(tl.float32)
    else:
        low = (words & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
        high = ((words >> 16) & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32)
        values = tl.reshape(tl.join(low, high), [BLOCK])
    return values


@triton.jit
def push_row_words(data, words, word_mask, stamp, buffer_ptrs, slot, region_words, row_start,
                   RANK: tl.constexpr, WORLD: tl.constexpr):
    """Send int32 words `data` (at word offsets `words` of a row) to every peer, each stamped with
    the call number as one 8-byte store: that single store is what keeps data and number together."""
    packets = stamp | (data.to(tl.int64) & 0xFFFFFFFF)
    my_region = (slot * WORLD + RANK).to(tl.int64) * region_words
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_buffer = tl.load(buffer_ptrs + peer).to(tl.pointer_type(tl.int64))
            tl.store(peer_buffer + my_region + row_start + words, packets, mask=word_mask)


# `slot` is 0 or 1: unspecialised, so both slots share one compiled kernel and it stays a tensor
# (Triton would otherwise fold a 1 into a Python int).
@triton.jit(do_not_specialize=["slot"])
def _all_reduce_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    buffer_ptrs,  # int64 [WORLD]: every rank's symmetric buffer
    calls_ptr,  # int32 [2, MAX_ROWS]: this rank's call counter per (slot, row)
    slot, region_words, hidden, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, MAX_ROWS: tl.constexpr,
    PER_WORD: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PUSHED: tl.constexpr,
):
    row = tl.program_id(0)
    dtype = x_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    offs = row.to(tl.int64) * hidden + cols
    WORDS: tl.constexpr = BLOCK // PER_WORD
    row_words = hidden // PER_WORD
    words = tl.arange(0, WORDS)
    word_mask = words < row_words

    call = tl.load(calls_ptr + slot * MAX_ROWS + row) + 1
    stamp = call.to(tl.int64) << 32
    # Every buffer holds, per slot, one region per sending rank (in 8-byte words); a row's words
    # start at row_start in it.
    row_start = row.to(tl.int64) * row_words
    if not PUSHED:  # (PUSHED: the GEMV that produced x already sent it, `push_row_words`)
        data = tl.load(x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + row.to(tl.int64) * row_words + words,
                       mask=word_mask, other=0)
        push_row_words(data, words, word_mask, stamp, buffer_ptrs, slot, region_words, row_start, RANK, WORLD)

    # Sum in rank order (identical on every rank), waiting for each peer's row to arrive whole.
    my_buffer = tl.load(buffer_ptrs + RANK).to(tl.pointer_type(tl.int64))
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for sender in tl.static_range(WORLD):
        if sender == RANK:
            acc += tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            inbox = my_buffer + (slot * WORLD + sender).to(tl.int64) * region_words + row_start + words
            got = tl.load(inbox, mask=word_mask, other=stamp, volatile=True)
            while tl.min(((got >> 32).to(tl.int32) == call).to(tl.int32), 0) == 0:
                got = tl.load(inbox, mask=word_mask, other=stamp, volatile=True)
            acc += _words_to_float(got.to(tl.int32), dtype, PER_WORD, BLOCK)
    tl.store(calls_ptr + slot * MAX_ROWS + row, call)
    reduced = acc.to(dtype).to(tl.float32)

    if HAS_RESIDUAL:
        x = reduced + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:  # no residual to add: the sum itself is the new residual stream
        x = reduced
    x_rounded = x.to(dtype)
    tl.store(residual_out_ptr + offs, x_rounded, mask=mask)
    rms_norm_store(x_rounded.to(tl.float32), weight_ptr, out_ptr, offs, cols, mask, hidden, eps)


def all_reduce_add_rms_norm(
    x: torch.Tensor,  # [rows, hidden] this rank's partial sums, contiguous
    residual: torch.Tensor | None,  # [rows, hidden] contiguous; None: none to add
    weight: torch.Tensor,  # [hidden]
    eps: float,
    buffer_ptrs: torch.Tensor,  # int64 [world] on x's device
    call_counters: torch.Tensor,  # int32 [NUM_SLOTS, max_rows] on x's device, zeros at start, this rank's own
    slot: int,  # 0 or 1, alternating (module docstring)
    region_words: int,  # 8-byte words per (slot, sending rank) region of every buffer
    rank: int,
    world_size: int,
    pushed: bool = False,  # x's row was already sent to the peers by the GEMV that made it
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum_ranks(x) + residual) * weight, sum_ranks(x) + residual), every rank alike
    (without a residual: the norm of the sum, and the sum)."""
    rows, hidden = x.shape
    per_word = 4 // x.element_size()
    assert per_word in (1, 2) and hidden % (4 * per_word) == 0 and rows <= call_counters.shape[1]
    assert rows * hidden // per_word <= region_words
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(hidden)
        _all_reduce_add_rms_norm_kernel[(rows,)](
            x, x if residual is None else residual, weight, out, residual_out, buffer_ptrs, call_counters,
            slot, region_words, hidden, eps,
            RANK=rank, WORLD=world_size, MAX_ROWS=call_counters.shape[1], PER_WORD=per_word, BLOCK=block,
            HAS_RESIDUAL=residual is not None, PUSHED=pushed, num_warps=max(1, min(16, block // 512)),
        )
    return out, residual_out


def all_reduce_add_rms_norm_ref(
    parts: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every rank must get, from all ranks' partial rows (tests and the benchmark script):
    the sum in rank order rounded to the model dtype, then the add and norm of `rms_norm_ref`."""
    from tokenmill.ops.rms_norm import rms_norm_ref

    total = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        total += part.float()
    total = total.to(parts[0].dtype)
    if residual is None:
        return rms_norm_ref(total, weight, eps), total
    return rms_norm_ref(total, weight, eps, residual)
