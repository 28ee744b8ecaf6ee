"""All-reduce, residual add and RMSNorm in one kernel, over symmetric memory.

In tensor-parallel decode every attention and MLP block ends in a row-parallel projection whose
partial sums are all-reduced and then, at once, added to the residual stream and normalised for
the next block. Done one after the other that is two launches per block (the one-shot all-reduce,
then the fused add + RMSNorm), 160 of each per token of Llama-3.1-70B, each a few microseconds of
mostly latency. This kernel does all of it in one launch. Each program takes one token row:

1. it publishes this rank's partial row in this rank's symmetric buffer;
2. it meets the other ranks at a per-row barrier: a flag set in each peer's signal pad (release,
   system scope, after a CTA barrier so every thread's store is ordered before it), then a wait
   for each peer's flag in its own pad (acquire), which it resets for the next call;
3. it sums every rank's row in rank order, in float32, so that every rank computes bit-identical
   results, as the replicated residual stream requires; the sum is rounded to the model dtype,
   as the separate all-reduce would leave it;
4. it adds the residual and normalises with `layers/triton_ops.rms_norm`'s own code.

Buffer reuse: the caller alternates two slots (attention's sums in slot 0, the MLP's in slot 1).
A rank writes slot s again only two calls later, after passing the other slot's barrier, which a
peer enters only once its previous kernel (the one reading slot s) has finished. So one barrier per
call suffices and no slot is overwritten while a peer still reads it.

Flags are per (row, sending rank); a rank that sends again before the peer consumed its previous
flag spins until it is consumed, so the flags never drift whatever the timing. Every rank must
make the same sequence of calls with the same row counts, which tensor-parallel ranks running one
model on one schedule do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.model.layers.triton_ops import rms_norm_store


@triton.jit
def _all_reduce_add_rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    buffer_ptrs, signal_ptrs,  # int64 [WORLD]: every rank's symmetric buffer and signal pad
    slot_offset, hidden, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    offs = row.to(tl.int64) * hidden + cols
    dtype = x_ptr.dtype.element_ty
    mine = tl.load(x_ptr + offs, mask=mask, other=0.0)
    # Pointers made from integers carry no alignment: assert 16 bytes (symmetric buffers are
    # page-aligned, slots and rows are multiples of 16 elements) so loads and stores vectorise.
    my_buffer = tl.multiple_of(tl.load(buffer_ptrs + RANK).to(tl.pointer_type(dtype)), 16)
    tl.store(my_buffer + slot_offset + offs, mine, mask=mask)

    # Barrier with every peer for this row (flags: [row, sending rank] in the receiver's pad).
    tl.debug_barrier()
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            peer_pad = tl.load(signal_ptrs + peer).to(tl.pointer_type(tl.int32))
            flag = peer_pad + row * WORLD + RANK
            sent = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
            while sent != 0:  # the peer has not yet consumed our previous call's flag
                sent = tl.atomic_cas(flag, 0, 1, sem="release", scope="sys")
    my_pad = tl.load(signal_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            flag = my_pad + row * WORLD + peer
            got = tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys")
            while got != 1:
                got = tl.atomic_cas(flag, 1, 0, sem="acquire", scope="sys")
    tl.debug_barrier()

    # Sum in rank order (identical on every rank). Peer rows are read uncached (.cv): the same
    # addresses held another call's values two calls ago.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == RANK:
            acc += mine.to(tl.float32)
        else:
            peer_buffer = tl.multiple_of(tl.load(buffer_ptrs + peer).to(tl.pointer_type(dtype)), 16)
            theirs = tl.load(peer_buffer + slot_offset + offs, mask=mask, other=0.0, cache_modifier=".cv")
            acc += theirs.to(tl.float32)
    reduced = acc.to(dtype).to(tl.float32)

    x = reduced + tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x_rounded = x.to(dtype)
    tl.store(residual_out_ptr + offs, x_rounded, mask=mask)
    rms_norm_store(x_rounded.to(tl.float32), weight_ptr, out_ptr, offs, cols, mask, hidden, eps)


def all_reduce_add_rms_norm(
    x: torch.Tensor,  # [rows, hidden] this rank's partial sums, contiguous
    residual: torch.Tensor,  # [rows, hidden] contiguous
    weight: torch.Tensor,  # [hidden]
    eps: float,
    buffer_ptrs: torch.Tensor,  # int64 [world] on x's device
    signal_ptrs: torch.Tensor,  # int64 [world] on x's device
    slot_offset: int,  # elements into every rank's buffer
    rank: int,
    world_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(sum_ranks(x) + residual) * weight, sum_ranks(x) + residual), every rank alike."""
    rows, hidden = x.shape
    out = torch.empty_like(x)
    residual_out = torch.empty_like(x)
    if rows:
        block = triton.next_power_of_2(hidden)
        _all_reduce_add_rms_norm_kernel[(rows,)](
            x, residual, weight, out, residual_out, buffer_ptrs, signal_ptrs,
            slot_offset, hidden, eps,
            RANK=rank, WORLD=world_size, BLOCK=block, num_warps=max(1, min(16, block // 512)),
        )
    return out, residual_out


def all_reduce_add_rms_norm_ref(
    parts: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What every rank must get, from all ranks' partial rows (tests and the benchmark script):
    the sum in rank order rounded to the model dtype, then the add and norm of `rms_norm_ref`."""
    from tokenmill.model.layers.triton_ops import rms_norm_ref

    total = torch.zeros(parts[0].shape, dtype=torch.float32, device=parts[0].device)
    for part in parts:
        total += part.float()
    return rms_norm_ref(total.to(parts[0].dtype), weight, eps, residual)
