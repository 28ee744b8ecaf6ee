"""Sort a step's (token, expert) pairs by expert into blocks of `block_m` rows, for the grouped
GEMMs of `fused_moe.py`: a Triton kernel beside its PyTorch reference.

A step routes T tokens to k experts each: M = T * k *entries*, entry `i` being token `i // k`'s
`i % k`-th choice. The grouped GEMM multiplies `block_m` rows at a time by one expert's weights,
so each expert's entries are laid out contiguously and padded to a multiple of `block_m`:

- `sorted_ids [max_padded]` int32: the entry ids, expert by expert (ascending entry id within an
  expert), each expert's run padded with `M` (a row id no entry has: masked by the GEMMs).
- `block_expert [max_blocks]` int32: the local expert of each block, -1 past the used blocks.
- `num_padded [1]` int32: how many slots of `sorted_ids` are used (a multiple of `block_m`).

Sizes depend only on M, the local expert count and `block_m` (Python ints), never on the
routing: no host sync, so the whole MoE layer can be captured in a CUDA graph. Only experts that
received entries get blocks, so `max_padded = M + min(M, E_local) * (block_m - 1)`. Entries whose
expert is not on this rank (`expert_map[e] == -1`, expert parallelism) are left out.

The kernel works on chunks of entries (the next power of two >= M, at most `MAX_CHUNK`): per
chunk, a histogram of its experts and an in-register sort of (expert, entry) keys give each entry
its rank within its expert; a prefix over experts (padded counts) and over chunks gives where each
run starts. One chunk (M <= MAX_CHUNK: decode batches up to 1024 / k tokens) runs as one program;
more run as three launches (histograms, prefix, scatter). Up to SMALL_CHUNK entries (the small
decode batches, where the alignment is pure latency on the step's critical path) the program
compares every entry with every other in registers instead (`_align_small_kernel`): no sort, no
round trip through memory. Deterministic: no atomics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tokenmill.ops.pdl import launch_options, pdl_enter

MAX_CHUNK = 1024  # entries per program: one launch covers decode batches up to 1024 / top_k tokens
SMALL_CHUNK = 128  # up to this many entries (16 tokens of top-8), comparisons in registers instead of a sort
BLOCKS_PER_ITER = 32  # block_expert entries written per loop iteration


class MoeAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # [max_padded] int32, entry ids by expert, padded with M
    block_expert: torch.Tensor  # [max_blocks] int32, local expert per block, -1 where unused
    num_padded: torch.Tensor  # [1] int32
    block_m: int


def max_padded_slots(num_entries: int, num_local_experts: int, block_m: int) -> int:
    return num_entries + min(num_entries, num_local_experts) * (block_m - 1)


def moe_align_ref(topk_ids: torch.Tensor, block_m: int, num_local_experts: int,
                  expert_map: torch.Tensor | None = None) -> MoeAlignment:
    """The reference (host-side loops). `topk_ids` [T, k] global expert ids."""
    flat = topk_ids.flatten().long()
    local = flat if expert_map is None else expert_map.long()[flat]
    m = flat.numel()
    max_padded = max_padded_slots(m, num_local_experts, block_m)
    sorted_ids = torch.full((max_padded,), m, dtype=torch.int32)
    block_expert = torch.full((triton.cdiv(max_padded, block_m),), -1, dtype=torch.int32)
    slot = 0
    for expert in range(num_local_experts):
        entries = torch.nonzero(local == expert).flatten()
        if entries.numel() == 0:
            continue
        sorted_ids[slot:slot + entries.numel()] = entries.to(torch.int32)
        padded = triton.cdiv(entries.numel(), block_m) * block_m
        block_expert[slot // block_m:(slot + padded) // block_m] = expert
        slot += padded
    return MoeAlignment(sorted_ids, block_expert, torch.tensor([slot], dtype=torch.int32), block_m)


@triton.jit
def _chunk_experts(topk_ids_ptr, expert_map_ptr, chunk, num_entries, num_local,
                   HAS_MAP: tl.constexpr, CHUNK: tl.constexpr):
    """The local expert of each of this chunk's entries [CHUNK] (`num_local` where the lane is
    past the last entry or its expert is not on this rank: the histograms' spare bin)."""
    entries = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = entries < num_entries
    expert = tl.load(topk_ids_ptr + entries, mask=valid, other=0)
    if HAS_MAP:
        expert = tl.load(expert_map_ptr + expert, mask=valid, other=-1)
    return tl.where(valid & (expert >= 0), expert, num_local)


@triton.jit
def _store_used_and_padding(total, num_padded_ptr, sorted_ids_ptr, num_entries, max_padded,
                            BLOCK_M: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr):
    """The used slot count, and every slot of `sorted_ids` set to the padding id (the entries are
    scattered over it afterwards)."""
    tl.store(num_padded_ptr, total)
    for start in range(0, max_padded, BLOCKS_PER_ITER * BLOCK_M):
        slots = start + tl.arange(0, BLOCKS_PER_ITER * BLOCK_M)
        tl.store(sorted_ids_ptr + slots, num_entries, mask=slots < max_padded)


@triton.jit
def _write_offsets(counts, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                   num_entries, num_local, max_padded, max_blocks,
                   BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr):
    """From every expert's entry count [NUM_BINS] (the spare bin last): the used slot count, every
    block's expert, and `sorted_ids` filled with the padding id (the entries are scattered over it
    afterwards). Returns where each expert's padded run starts [NUM_BINS]."""
    bins = tl.arange(0, NUM_BINS)
    real = bins < num_local
    padded = tl.where(real, (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    run_end = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    _store_used_and_padding(total, num_padded_ptr, sorted_ids_ptr, num_entries, max_padded, BLOCK_M, BLOCKS_PER_ITER)
    for first in range(0, max_blocks, BLOCKS_PER_ITER):
        blocks = first + tl.arange(0, BLOCKS_PER_ITER)
        slot = blocks * BLOCK_M
        # A block's expert: how many real runs end at or before its first slot.
        expert = tl.sum(((run_end[None, :] <= slot[:, None]) & real[None, :]).to(tl.int32), 1)
        expert = tl.where(slot < total, expert, -1)
        tl.store(block_expert_ptr + blocks, expert, mask=blocks < max_blocks)
    return run_end - padded


@triton.jit
def _scatter_chunk(chunk, expert, run_start_ptr, scratch_ptr, sorted_ids_ptr, num_local,
                   NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    """Write chunk `chunk`'s entries (their local experts: `expert` [CHUNK]) to `sorted_ids`: slot =
    where this chunk's part of the expert's run starts (`run_start_ptr` [NUM_BINS]) + the entry's
    rank among the chunk's entries of that expert. `scratch_ptr`: [NUM_BINS] of this program's own."""
    lanes = tl.arange(0, CHUNK)
    keys = tl.sort(expert * CHUNK + lanes)  # by expert, then by entry: ranks follow entry order
    key_expert = keys // CHUNK
    key_real = key_expert < num_local
    # The sorted position of an expert's first entry: the entries of all lower experts.
    counts = tl.histogram(expert, NUM_BINS)
    tl.store(scratch_ptr + tl.arange(0, NUM_BINS), tl.cumsum(counts, 0) - counts)
    tl.debug_barrier()
    rank = lanes - tl.load(scratch_ptr + key_expert, mask=key_real, other=0)
    slot = tl.load(run_start_ptr + key_expert, mask=key_real, other=0) + rank
    tl.store(sorted_ids_ptr + slot, chunk * CHUNK + keys % CHUNK, mask=key_real)


# Sizes that change with the batch are not specialised on (divisibility, == 1): one compiled
# kernel serves every batch size.
_BATCH_SIZES = ["num_entries", "max_padded", "max_blocks", "num_chunks"]


@triton.jit(do_not_specialize=_BATCH_SIZES[:3])
def _align_one_chunk_kernel(topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                            run_start_ptr, scratch_ptr, num_entries, num_local, max_padded, max_blocks,
                            HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr,
                            CHUNK: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr, PDL: tl.constexpr = False):
    """Every entry in one chunk: the whole alignment in one program."""
    pdl_enter(PDL)
    expert = _chunk_experts(topk_ids_ptr, expert_map_ptr, 0, num_entries, num_local, HAS_MAP, CHUNK)
    run_start = _write_offsets(tl.histogram(expert, NUM_BINS), sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                               num_entries, num_local, max_padded, max_blocks, BLOCK_M, NUM_BINS, BLOCKS_PER_ITER)
    tl.store(run_start_ptr + tl.arange(0, NUM_BINS), run_start)
    tl.debug_barrier()  # the padding fill and the run starts land before the scatter reads / overwrites them
    _scatter_chunk(0, expert, run_start_ptr, scratch_ptr, sorted_ids_ptr, num_local, NUM_BINS, CHUNK)


@triton.jit(do_not_specialize=_BATCH_SIZES[:3])
def _align_small_kernel(topk_ids_ptr, expert_map_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                        num_entries, num_local, max_padded, max_blocks,
                        HAS_MAP: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCKS_PER_ITER: tl.constexpr, PDL: tl.constexpr = False):
    """Every entry of a decode step (at most SMALL_CHUNK) in one program, from entry-by-entry
    comparisons held in registers ([CHUNK, CHUNK]) instead of a sort, two histograms and the
    round trips through memory between them: each entry's rank within its expert (the entries of
    its expert before it), its run's start (the padded runs of lower experts, counted at their
    first entries), and each block's expert (the highest whose run starts at or before it)."""
    pdl_enter(PDL)
    expert = _chunk_experts(topk_ids_ptr, expert_map_ptr, 0, num_entries, num_local, HAS_MAP, CHUNK)
    real = expert < num_local
    lanes = tl.arange(0, CHUNK)
    same = expert[:, None] == expert[None, :]
    count = tl.sum(same.to(tl.int32), 1)
    rank = tl.sum((same & (lanes[None, :] < lanes[:, None])).to(tl.int32), 1)
    first = real & (rank == 0)
    padded = tl.where(first, (count + BLOCK_M - 1) // BLOCK_M * BLOCK_M, 0)
    start = tl.sum(tl.where(expert[None, :] < expert[:, None], padded[None, :], 0), 1)
    total = tl.sum(padded, 0)
    _store_used_and_padding(total, num_padded_ptr, sorted_ids_ptr, num_entries, max_padded, BLOCK_M, BLOCKS_PER_ITER)
    for first_block in range(0, max_blocks, BLOCKS_PER_ITER):
        blocks = first_block + tl.arange(0, BLOCKS_PER_ITER)
        slot = blocks * BLOCK_M
        covers = first[None, :] & (start[None, :] <= slot[:, None])
        block_expert = tl.max(tl.where(covers, expert[None, :], -1), 1)
        tl.store(block_expert_ptr + blocks, tl.where(slot < total, block_expert, -1), mask=blocks < max_blocks)
    tl.debug_barrier()  # the padding fill lands before the entries overwrite their slots
    tl.store(sorted_ids_ptr + start + rank, lanes, mask=real)


@triton.jit(do_not_specialize=_BATCH_SIZES[:1])
def _chunk_counts_kernel(topk_ids_ptr, expert_map_ptr, counts_ptr, num_entries, num_local,
                         HAS_MAP: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    expert = _chunk_experts(topk_ids_ptr, expert_map_ptr, chunk, num_entries, num_local, HAS_MAP, CHUNK)
    tl.store(counts_ptr + chunk * NUM_BINS + tl.arange(0, NUM_BINS), tl.histogram(expert, NUM_BINS))


@triton.jit(do_not_specialize=_BATCH_SIZES)
def _chunk_offsets_kernel(counts_ptr, chunk_start_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                          num_chunks, num_entries, num_local, max_padded, max_blocks,
                          BLOCK_M: tl.constexpr, NUM_BINS: tl.constexpr, BLOCKS_PER_ITER: tl.constexpr):
    """One program: the runs from every chunk's counts, then where each chunk's part of each run starts."""
    bins = tl.arange(0, NUM_BINS)
    total = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for chunk in range(num_chunks):
        total += tl.load(counts_ptr + chunk * NUM_BINS + bins)
    start = _write_offsets(total, sorted_ids_ptr, block_expert_ptr, num_padded_ptr, num_entries, num_local,
                           max_padded, max_blocks, BLOCK_M, NUM_BINS, BLOCKS_PER_ITER)
    for chunk in range(num_chunks):
        tl.store(chunk_start_ptr + chunk * NUM_BINS + bins, start)
        start += tl.load(counts_ptr + chunk * NUM_BINS + bins)


@triton.jit(do_not_specialize=_BATCH_SIZES[:1])
def _chunk_scatter_kernel(topk_ids_ptr, expert_map_ptr, chunk_start_ptr, scratch_ptr, sorted_ids_ptr,
                          num_entries, num_local,
                          HAS_MAP: tl.constexpr, NUM_BINS: tl.constexpr, CHUNK: tl.constexpr):
    chunk = tl.program_id(0)
    expert = _chunk_experts(topk_ids_ptr, expert_map_ptr, chunk, num_entries, num_local, HAS_MAP, CHUNK)
    _scatter_chunk(chunk, expert, chunk_start_ptr + chunk * NUM_BINS, scratch_ptr + chunk * NUM_BINS,
                   sorted_ids_ptr, num_local, NUM_BINS, CHUNK)


def moe_align(topk_ids: torch.Tensor, block_m: int, num_local_experts: int,
              expert_map: torch.Tensor | None = None, chunk: int | None = None, pdl: bool = False) -> MoeAlignment:
    """Align `topk_ids` ([T, k] int32 global expert ids, contiguous) by local expert into blocks
    of `block_m` (`expert_map` [E] int32 global -> local or -1; None: every expert is local).
    `chunk`: entries per program (a power of two; default from M). `pdl`: the one-program form
    launches dependent (`pdl.py`)."""
    assert topk_ids.dtype == torch.int32 and topk_ids.is_contiguous()
    assert expert_map is None or expert_map.dtype == torch.int32
    num_entries = topk_ids.numel()
    device = topk_ids.device
    max_padded = max_padded_slots(num_entries, num_local_experts, block_m)
    max_blocks = triton.cdiv(max_padded, block_m)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    num_bins = triton.next_power_of_2(num_local_experts + 1)  # + the spare bin
    if chunk is None:
        chunk = min(MAX_CHUNK, max(16, triton.next_power_of_2(num_entries)))
    assert chunk & (chunk - 1) == 0
    num_chunks = triton.cdiv(num_entries, chunk)
    map_arg = expert_map if expert_map is not None else topk_ids  # not read without HAS_MAP
    sizes = (num_entries, num_local_experts, max_padded, max_blocks)
    if num_chunks <= 1 and chunk <= SMALL_CHUNK:
        _align_small_kernel[(1,)](
            topk_ids, map_arg, sorted_ids, block_expert, num_padded, *sizes, HAS_MAP=expert_map is not None,
            BLOCK_M=block_m, CHUNK=chunk, BLOCKS_PER_ITER=BLOCKS_PER_ITER, PDL=pdl, num_warps=8,
            **launch_options(pdl))
    elif num_chunks <= 1:
        scratch = torch.empty(2 * num_bins, dtype=torch.int32, device=device)
        _align_one_chunk_kernel[(1,)](
            topk_ids, map_arg, sorted_ids, block_expert, num_padded, scratch, scratch[num_bins:], *sizes,
            HAS_MAP=expert_map is not None, BLOCK_M=block_m, NUM_BINS=num_bins, CHUNK=chunk,
            BLOCKS_PER_ITER=BLOCKS_PER_ITER, PDL=pdl, num_warps=4, **launch_options(pdl))
    else:
        counts = torch.empty(num_chunks, num_bins, dtype=torch.int32, device=device)
        chunk_start = torch.empty_like(counts)
        scratch = torch.empty_like(counts)
        _chunk_counts_kernel[(num_chunks,)](topk_ids, map_arg, counts, num_entries, num_local_experts,
                                            HAS_MAP=expert_map is not None, NUM_BINS=num_bins, CHUNK=chunk)
        _chunk_offsets_kernel[(1,)](counts, chunk_start, sorted_ids, block_expert, num_padded, num_chunks, *sizes,
                                    BLOCK_M=block_m, NUM_BINS=num_bins, BLOCKS_PER_ITER=BLOCKS_PER_ITER)
        _chunk_scatter_kernel[(num_chunks,)](topk_ids, map_arg, chunk_start, scratch, sorted_ids, num_entries,
                                             num_local_experts, HAS_MAP=expert_map is not None,
                                             NUM_BINS=num_bins, CHUNK=chunk)
    return MoeAlignment(sorted_ids, block_expert, num_padded, block_m)
