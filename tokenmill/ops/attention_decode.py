"""Paged decode with split-KV (flash-decoding), in one launch.

Grid: (request, KV head, split). The context of each (request, KV head) is cut into `num_splits`
contiguous ranges of whole tiles, one program each. One program serves all the query heads of its
KV head group (padded to BLOCK_H rows for `tl.dot`), so each K/V block is read from memory once
per group, not once per query head.

A context shorter than `num_splits` tiles leaves the last splits without tiles (a graph captured
for 4k tokens and replayed at 528 has 9 tiles of 64 for 32 splits): those programs return at once,
without loading q, storing anything or touching the counter. The active count,
cdiv(num_tiles, tiles_per_split), comes from the real `seq_len` on the device, so every program
of a (request, KV head) computes the same one; split 0 always counts, so a padding request
(seq_len 0) still writes its zero output.

Each active program writes a normalised partial output and its log-sum-exp, then counts itself in
on a per-(request, KV head) counter; the program that arrives last (the active count is the
counter's target) merges the partials and writes the output, and resets the counter to 0 for the
next launch. This saves the separate reduce kernel (a launch and a round of latency per layer,
which is most of the cost at batch 1 and short contexts). The merge loads the split lanes of
MERGE_H query heads at once (every head of the group at the usual shapes), so it costs one
dependent round trip to L2 for the lot, not one per head. Where the group's lanes fit one tile
only at a narrower width (MERGE_S lanes), a context of up to twice that many tiles takes two tiles
a split, so that it merges in one round trip too (513-1024 tokens in batch 1's 32-split graphs at
Qwen3-30B-A3B's shapes). With one split, or when only one split is active (at most one tile of
context, or seq_len 0), the program writes the output directly and touches no counter.

The cascade form (CASCADE, `launch_decode_kernel(prefix_len=...)`, used by attention_cascade.py)
runs one program per (request, KV head) from the end of a prefix every request shares, whose
lanes another kernel has written, and merges its own lane with them in the same merge.

The split count is a Python int chosen from batch size, head count and `max_seq_len`; the split
ranges come from the real `seq_lens` on the device, so the result is right for any length and a
CUDA graph captured once replays correctly for every shorter context.

With a sliding window (`sliding_window=W`, a layer constant) each request's context starts at its
key `seq_len - W`: the tiles before it are neither read nor split over, so a decode costs at most
W keys however long the request has run.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokenmill.ops import l2_prefetch
from tokenmill.ops.attention_common import (
    LOG2E,
    LaunchConfig,
    attend_kv_range,
    check_cache,
    dequantize_to_float32,
    finish_softmax,
)
from tokenmill.ops.l2_prefetch import prefetch_to_l2
from tokenmill.ops.pdl import launch_options, pdl_enter

DECODE_CONFIG = LaunchConfig(block_m=0, block_n=64, num_warps=4, num_stages=3)
DECODE_CONFIG_FP32 = LaunchConfig(block_m=0, block_n=32, num_warps=4, num_stages=2)  # (see PREFILL_CONFIG_FP32)
# The split-count heuristic never goes past this (measured on H100: no gain beyond 32 at 32k).
MAX_DECODE_SPLITS = 32
# A split shorter than this many tokens (one tile) costs more in merging than it saves.
_MIN_TOKENS_PER_SPLIT = 64


# Values that change from step to step are not specialised on (Triton would otherwise compile a
# new variant the first time one is 1 or a multiple of 16: a ~1-3 s stall in the middle of
# serving, measured on the H100 in docs/perf.md).
@triton.jit(do_not_specialize=["num_splits", "stride_bt_req"])
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, prefix_len_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr, prefetch_ptr, prefetch_bytes,
    scale_log2, num_splits, window, GROUP,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_req, k_scale, v_scale,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, GROUP_P2: tl.constexpr,
    MERGE_H: tl.constexpr, MERGE_S: tl.constexpr, DIRECT: tl.constexpr,
    KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr, CASCADE: tl.constexpr, PDL: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, THREADS: tl.constexpr = 128,
):
    if PREFETCH:  # weights of a later kernel into L2 (l2_prefetch.py): never written in a step, so before the wait
        program = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
        prefetch_to_l2(prefetch_ptr, prefetch_bytes, program,
                       tl.num_programs(0) * tl.num_programs(1) * tl.num_programs(2), THREADS, False)
    pdl_enter(PDL)
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + req)
    # CASCADE (one program per (request, KV head), see attention_cascade.py): the first `start`
    # tokens are the shared prefix, which the prefix kernel attended into lanes 0 .. num_splits - 2;
    # this program takes the rest, as the last lane (with no prefix, alone: the output).
    # Otherwise the context starts at 0, or with a sliding window (never with CASCADE) at the
    # window's first key: the tiles before it are never read (their blocks may be freed), so the
    # cost is bounded by the window.
    start = tl.load(prefix_len_ptr) if CASCADE else tl.where(window > 0, tl.maximum(seq_len - window, 0), 0)
    num_tiles = tl.cdiv(tl.maximum(seq_len - start, 0), BLOCK_N)
    if CASCADE:
        split = num_splits - 1
        num_active = tl.where(start == 0, 1, num_splits)
        tile_begin = 0
        tile_end = num_tiles
    else:
        # At least 1, so that seq_len 0 gives split 0 an empty range (and no division by 0 below).
        tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
        if MERGE_S < BLOCK_S:
            # A context a little past the narrow merge's lanes (MERGE_S < tiles <= 2 MERGE_S) gets
            # two tiles a split: the merge then takes one round trip for the whole group, where
            # single tiles would need ceil(GROUP / MERGE_H) of them (see _merge_group).
            pair = (tiles_per_split == 1) & (num_tiles > MERGE_S) & (num_tiles <= 2 * MERGE_S)
            tiles_per_split = tl.where(pair, 2, tiles_per_split)
        # Splits [0, num_active) have tiles; split 0 counts even without (seq_len 0: it writes
        # zeros). The same value in every program of this (request, KV head): the counter's target.
        num_active = tl.maximum(tl.cdiv(num_tiles, tiles_per_split), 1)
        if split >= num_active:
            return  # no tiles: nothing to store, not counted in (never taken with DIRECT: 1 split)
        tile_begin = split * tiles_per_split
        tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    h_offs = tl.arange(0, BLOCK_H)
    h_mask = h_offs < GROUP
    heads = kv_head * GROUP + h_offs
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    qh_mask = h_mask[:, None] & dim_mask[None, :]
    q = tl.load(
        q_ptr + req.to(tl.int64) * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
        mask=qh_mask, other=0.0,
    )
    block_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    m_i, l_i, acc = attend_kv_range(
        q, k_cache_ptr, v_cache_ptr, block_row_ptr, start, tile_begin, tile_end, seq_len, kv_head, dims,
        dim_mask, stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, scale_log2, m_i, l_i, acc,
        PAGE, BLOCK_N, KV_FP8, KV_SCALED,
    )

    # A padding request (seq_len 0) leaves l = 0: output 0 (and lse = -inf).
    out, lse = finish_softmax(m_i, l_i, acc)
    out_offs = req.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :]
    if DIRECT:
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=qh_mask)
    elif num_active == 1:
        # The only active split: its partial is the output (a one-lane merge would multiply it by
        # exp2(0) = 1 and divide by 1), so no partials and no counter.
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=qh_mask)
    else:
        # part_out: [num_decodes, num_heads, num_splits, BLOCK_D]; part_lse without the last axis.
        # Only the lanes of active splits are written, and only those are read by the merge.
        part_rows = (req.to(tl.int64) * (GROUP * num_kv_heads) + heads) * num_splits  # [BLOCK_H]
        tl.store(part_out_ptr + (part_rows + split)[:, None] * BLOCK_D + dims[None, :], out, mask=qh_mask)
        tl.store(part_lse_ptr + part_rows + split, lse, mask=h_mask)
        # Every thread's partial stores are ordered before the (single-thread) release below: the
        # pattern of CUTLASS's split-K semaphore (barrier, then one thread releases at gpu scope).
        tl.debug_barrier()
        if CASCADE:
            # The prefix kernel ran before this launch (stream order): its lanes are all written,
            # so this program merges at once (its own stores are visible to it after the barrier).
            _merge_group(out_ptr, part_out_ptr, part_lse_ptr, req, kv_head, num_kv_heads, num_active,
                         num_splits, GROUP, stride_o_tok, stride_o_head, dims, dim_mask,
                         BLOCK_S, GROUP_P2, MERGE_H, MERGE_S, BLOCK_D)
        else:
            counter = counter_ptr + req * num_kv_heads + kv_head
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_active - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
                tl.debug_barrier()
                _merge_group(out_ptr, part_out_ptr, part_lse_ptr, req, kv_head, num_kv_heads, num_active,
                             num_splits, GROUP, stride_o_tok, stride_o_head, dims, dim_mask,
                             BLOCK_S, GROUP_P2, MERGE_H, MERGE_S, BLOCK_D)


@triton.jit
def _merge_group(
    out_ptr, part_out_ptr, part_lse_ptr, req, kv_head, num_kv_heads, num_active, num_splits, GROUP,
    stride_o_tok, stride_o_head, dims, dim_mask, BLOCK_S: tl.constexpr, GROUP_P2: tl.constexpr,
    MERGE_H: tl.constexpr, MERGE_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the `num_active` lanes of one (request, KV head) and write its query heads' output.
    Merge in the log2 domain (_merge_partials), in one dependent L2 round trip for the whole group
    where the tile fits: a context with few active splits (the common case at short contexts)
    takes the narrow form, MERGE_S lanes by all GROUP_P2 heads."""
    group_row = req.to(tl.int64) * (GROUP * num_kv_heads) + kv_head * GROUP
    out_row_ptr = out_ptr + req.to(tl.int64) * stride_o_tok + kv_head * GROUP * stride_o_head
    if MERGE_S < BLOCK_S:
        if num_active <= MERGE_S:
            _merge_partials(out_row_ptr, part_out_ptr, part_lse_ptr, group_row, num_active, num_splits,
                            GROUP, stride_o_head, dims, dim_mask, MERGE_S, GROUP_P2, BLOCK_D)
        else:
            _merge_partials(out_row_ptr, part_out_ptr, part_lse_ptr, group_row, num_active, num_splits,
                            GROUP, stride_o_head, dims, dim_mask, BLOCK_S, MERGE_H, BLOCK_D)
    else:
        _merge_partials(out_row_ptr, part_out_ptr, part_lse_ptr, group_row, num_active, num_splits,
                        GROUP, stride_o_head, dims, dim_mask, BLOCK_S, MERGE_H, BLOCK_D)


@triton.jit
def _merge_partials(
    out_row_ptr, part_out_ptr, part_lse_ptr, group_row, num_active, num_splits, GROUP, stride_o_head,
    dims, dim_mask, LANES: tl.constexpr, HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the partials of the active splits of one KV group's query heads and write the output
    (`out_row_ptr` points at the group's first head). Per round of HEADS query heads, one load
    brings the lse of LANES split lanes each ([HEADS, LANES]) and one more their partial outputs
    ([HEADS, LANES, BLOCK_D]): one dependent L2 round trip per round (a loop over single heads or
    splits would be a chain of them; the stores of one round keep the next round's loads behind
    them). Lanes of splits past `num_active` were not written this launch and are masked off:
    they read as lse -inf and output 0, i.e. weight 0, as an empty split's partial would be.
    Loads bypass L1 (.cg): other programs wrote these lines, and an L1 line this SM read earlier
    in the launch could be stale."""
    s_offs = tl.arange(0, LANES)
    s_mask = s_offs < num_active
    h_offs = tl.arange(0, HEADS)
    for h0 in range(0, GROUP, HEADS):
        hs = h0 + h_offs
        hs_mask = hs < GROUP
        lanes = (group_row + hs)[:, None] * num_splits + s_offs[None, :]  # [HEADS, LANES]
        lane_mask = hs_mask[:, None] & s_mask[None, :]
        lse_s = tl.load(part_lse_ptr + lanes, mask=lane_mask, other=float("-inf"), cache_modifier=".cg")
        parts = tl.load(part_out_ptr + lanes[:, :, None] * BLOCK_D + dims[None, None, :],
                        mask=lane_mask[:, :, None] & dim_mask[None, None, :], other=0.0, cache_modifier=".cg")
        lse_max = tl.max(lse_s, 1)
        weights = tl.exp2(lse_s - tl.where(lse_max == float("-inf"), 0.0, lse_max)[:, None])
        total = tl.sum(weights, 1)
        merged = tl.sum(parts * weights[:, :, None], 1) / tl.where(total > 0.0, total, 1.0)[:, None]
        tl.store(out_row_ptr + hs[:, None] * stride_o_head + dims[None, :],
                 merged.to(out_row_ptr.dtype.element_ty), mask=hs_mask[:, None] & dim_mask[None, :])


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 16 under Triton's CPU interpreter (the split
    heuristics that use it are right for any value)."""
    if device.type != "cuda":
        return 16
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def decode_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Programs per (request, KV head). Measured on H100 at Llama-3.1-8B shapes: once the batch
    alone gives every SM a program, splitting adds merge work, except that two splits even out
    the last wave at long contexts (batch 32: 3% faster from 8k tokens, equal at 2k, 7% slower at
    512); below that, about two programs per SM, with no split shorter than
    _MIN_TOKENS_PER_SPLIT tokens of the longest context (batch 1: 8 splits at 512 tokens, 32 from
    2k tokens up)."""
    num_sms = sm_count(device)
    num_programs = num_decodes * num_kv_heads
    if num_programs >= num_sms:
        return 2 if num_programs < 4 * num_sms and max_seq_len >= 4096 else 1
    wanted = triton.cdiv(2 * num_sms, max(1, num_programs))
    useful = triton.cdiv(max(1, max_seq_len), _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_DECODE_SPLITS))


def _merge_width(num_splits: int) -> int:
    """Split lanes the merge loads at once: two widths only, so two compiled variants serve every
    split count (both compiled while the decode graphs are captured)."""
    # (An explicit num_splits above MAX_DECODE_SPLITS gets a wider variant of its own rather than
    # a merge that drops lanes.)
    return 8 if num_splits <= 8 else triton.next_power_of_2(max(num_splits, MAX_DECODE_SPLITS))


def _merge_tile(block_s: int) -> int:
    """Float32 elements of the partial-output tile the merge loads at once. The tile lives only in
    the merge, but the kernel's register count is its peak, and that sets how many programs share
    an SM in the K/V loop (compiled for sm90, bf16 cache, 4 warps, head_dim 128): with 8192
    elements (64 registers a thread) the 32-lane variant takes 135 registers, 3 programs an SM,
    enough for the ~2 programs an SM the split heuristic gives where it is used (16384 would take
    177, 2 an SM). The 8-lane variant also serves large batches with 2 splits, so 4096 there:
    96 registers at group 4 (5 programs an SM, as before), 115 at group 8 (4), as many as the
    1-split variant takes."""
    return 4096 if block_s <= 8 else 8192


def _merge_shape(group: int, block_s: int, block_d: int) -> tuple[int, int, int]:
    """(GROUP_P2, MERGE_H, MERGE_S) of the merge: query heads per round at the full BLOCK_S lanes,
    and a narrower lane count at which the whole group fits one round (for contexts with that
    many active splits or fewer); MERGE_S = BLOCK_S where the full tile already takes the group."""
    group_p2 = triton.next_power_of_2(group)
    tile = _merge_tile(block_s)
    merge_h = max(1, min(group_p2, tile // (block_s * block_d)))
    merge_s = min(block_s, tile // (group_p2 * block_d))
    if merge_h == group_p2 or merge_s < 2:
        merge_s = block_s
    return group_p2, merge_h, merge_s


def new_split_counters(num_entries: int, device: torch.device) -> torch.Tensor:
    """Zeroed counters for `paged_decode(split_counters=...)`, one per (request, KV head). The
    kernel leaves them zero, so one buffer serves every later launch on the same stream."""
    return torch.zeros(num_entries, dtype=torch.int32, device=device)


def paged_decode(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim], one query token per request
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= num_decodes, max_blocks] int32; row i is request i
    seq_lens: torch.Tensor,  # [>= num_decodes] int32; 0 gives a zero output (padding)
    out: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    max_seq_len: int,  # an upper bound of seq_lens; sizes the split count only
    scale: float,
    num_splits: int | None = None,
    split_counters: torch.Tensor | None = None,  # [>= num_decodes * num_kv_heads] int32, all 0
    config: LaunchConfig = DECODE_CONFIG,
    k_scale: float = 1.0,  # fp8 cache only: k = stored * k_scale
    v_scale: float = 1.0,
    sliding_window: int | None = None,  # attend the last this-many keys only (None: all)
    pdl: bool = False,  # launched dependent on the kernel before (ops/pdl.py)
    prefetch: torch.Tensor | None = None,  # weights of a kernel to come, asked of L2 as this one starts (l2_prefetch.py)
) -> None:
    num_decodes, num_heads, _ = q.shape
    if num_decodes == 0:
        return
    num_kv_heads = k_cache.shape[2]
    if num_splits is None:
        attended = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
        num_splits = decode_num_splits(num_decodes, num_kv_heads, attended, q.device)
    if num_splits == 1:
        part_out = part_lse = counters = out  # not touched by the kernel
    else:
        part_out, part_lse = new_partials(num_decodes, num_heads, num_splits, q)
        if split_counters is None:
            split_counters = new_split_counters(num_decodes * num_kv_heads, q.device)
        assert split_counters.numel() >= num_decodes * num_kv_heads and split_counters.dtype == torch.int32
        counters = split_counters
    launch_decode_kernel(q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse, counters,
                         num_splits, scale, config, k_scale, v_scale, sliding_window=sliding_window, pdl=pdl,
                         prefetch=prefetch)


def new_partials(num_decodes: int, num_heads: int, num_lanes: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Partial outputs [num_decodes, num_heads, num_lanes, BLOCK_D] and their log-sum-exps
    [num_decodes, num_heads, num_lanes], float32, for the decode kernel's merge."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    return (torch.empty(num_decodes, num_heads, num_lanes, block_d, dtype=torch.float32, device=q.device),
            torch.empty(num_decodes, num_heads, num_lanes, dtype=torch.float32, device=q.device))


def launch_decode_kernel(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, out: torch.Tensor, part_out: torch.Tensor, part_lse: torch.Tensor,
    counters: torch.Tensor, num_splits: int, scale: float, config: LaunchConfig, k_scale: float,
    v_scale: float, prefix_len: torch.Tensor | None = None, sliding_window: int | None = None,
    pdl: bool = False, prefetch: torch.Tensor | None = None,
) -> None:
    """One launch of `_paged_decode_kernel` over `num_splits` splits (see `paged_decode`), or, given
    `prefix_len` (device int32 [1]), its cascade form: one program per (request, KV head) over the
    context past the shared prefix, merged with the `num_splits - 1` prefix lanes already in
    `part_out` / `part_lse` (attention_cascade.py). A sliding window cannot be cascaded: the
    shared prefix would have to be cut at a different point for every request."""
    assert prefix_len is None or sliding_window is None, "cascade attention with a sliding window"
    assert sliding_window is None or sliding_window >= 1
    num_decodes, num_heads, head_dim = q.shape
    kv_fp8 = check_cache(k_cache, v_cache)
    if config is DECODE_CONFIG and q.element_size() > 2:
        config = DECODE_CONFIG_FP32
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_s = _merge_width(num_splits)
    group_p2, merge_h, merge_s = _merge_shape(group, block_s, block_d)
    cascade = prefix_len is not None
    prefetch_bytes = l2_prefetch.check_range(prefetch) if prefetch is not None else 0
    _paged_decode_kernel[(num_decodes, num_kv_heads, 1 if cascade else num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, prefix_len if cascade else seq_lens,
        out, part_out, part_lse, counters, prefetch if prefetch is not None else out, prefetch_bytes,
        scale * LOG2E, num_splits, sliding_window or 0, group,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        float(k_scale), float(v_scale),
        BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=k_cache.shape[1], BLOCK_N=config.block_n if head_dim <= 128 else min(config.block_n, 32),
        BLOCK_S=block_s, GROUP_P2=group_p2, MERGE_H=merge_h, MERGE_S=merge_s,
        DIRECT=num_splits == 1 and not cascade,
        KV_FP8=kv_fp8, KV_SCALED=dequantize_to_float32(kv_fp8, k_scale, v_scale), CASCADE=cascade,
        PDL=pdl, PREFETCH=prefetch is not None, THREADS=32 * config.num_warps,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **launch_options(pdl),
    )
