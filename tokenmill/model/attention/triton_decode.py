"""Paged decode with split-KV (flash-decoding), in one launch.

Grid: (request, KV head, split). The context of each (request, KV head) is cut into `num_splits`
contiguous ranges of whole tiles, one program each. One program serves all the query heads of its
KV head group (padded to BLOCK_H rows for `tl.dot`), so each K/V block is read from memory once
per group, not once per query head.

Each program writes a normalised partial output and its log-sum-exp, then counts itself in on a
per-(request, KV head) counter; the program that arrives last merges the partials and writes the
output, and resets the counter to 0 for the next launch. This saves the separate reduce kernel
(a launch and a round of latency per layer, which is most of the cost at batch 1 and short
contexts). With one split the program writes the output directly and touches no counter.

The split count is a Python int chosen from batch size, head count and `max_seq_len`; the split
ranges come from the real `seq_lens` on the device, so the result is right for any length and a
CUDA graph captured once replays correctly for every shorter context.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tokenmill.model.attention.triton_common import (
    LOG2E,
    KernelConfig,
    check_cache,
    dequantize_to_float32,
    load_kv_tile,
    online_softmax_step,
)

DECODE_CONFIG = KernelConfig(block_m=0, block_n=64, num_warps=4, num_stages=3)
DECODE_CONFIG_FP32 = KernelConfig(block_m=0, block_n=32, num_warps=4, num_stages=2)  # (see PREFILL_CONFIG_FP32)
# The split-count heuristic never goes past this (measured on H100: no gain beyond 32 at 32k).
MAX_DECODE_SPLITS = 32
# A split shorter than this many tokens (one tile) costs more in merging than it saves.
_MIN_TOKENS_PER_SPLIT = 64


# Values that change from step to step are not specialised on (Triton would otherwise compile a
# new variant the first time one is 1 or a multiple of 16: a ~1-3 s stall in the middle of
# serving, measured on the H100 in docs/perf.md).
@triton.jit(do_not_specialize=["num_splits", "stride_bt_req"])
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr, counter_ptr,
    scale_log2, num_splits, GROUP,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_req, k_scale, v_scale,
    BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, DIRECT: tl.constexpr,
    KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    seq_len = tl.load(seq_lens_ptr + req)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
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
    for tile in range(tile_begin, tile_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_mask = offs_n < seq_len
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, key_mask, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE, KV_FP8, KV_SCALED,
        )
        m_i, l_i, acc = online_softmax_step(q, k, v, key_mask[None, :], m_i, l_i, acc, scale_log2)

    # An empty split (or a padding request with seq_len 0) leaves l = 0: output 0, lse = -inf.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_offs = req.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :]
    if DIRECT:
        tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=qh_mask)
    else:
        # part_out: [num_decodes, num_heads, num_splits, BLOCK_D]; part_lse without the last axis.
        part_rows = (req.to(tl.int64) * (GROUP * num_kv_heads) + heads) * num_splits  # [BLOCK_H]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + (part_rows + split)[:, None] * BLOCK_D + dims[None, :], out, mask=qh_mask)
        tl.store(part_lse_ptr + part_rows + split, lse, mask=h_mask)
        # Every thread's partial stores are ordered before the (single-thread) release below: the
        # pattern of CUTLASS's split-K semaphore (barrier, then one thread releases at gpu scope).
        tl.debug_barrier()
        counter = counter_ptr + req * num_kv_heads + kv_head
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == num_splits - 1:
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # ready for the next launch
            tl.debug_barrier()
            # Merge in the log2 domain, one query head at a time with all its splits in one
            # vector load (a loop over splits would be a chain of dependent L2 round trips).
            # Loads bypass L1 (.cg): other programs wrote these lines, and an L1 line this SM
            # read earlier in the launch could be stale.
            s_offs = tl.arange(0, BLOCK_S)
            s_mask = s_offs < num_splits
            for h in range(0, GROUP):
                row = (req.to(tl.int64) * (GROUP * num_kv_heads) + kv_head * GROUP + h) * num_splits
                lse_s = tl.load(part_lse_ptr + row + s_offs, mask=s_mask, other=float("-inf"),
                                cache_modifier=".cg")
                parts = tl.load(part_out_ptr + (row + s_offs)[:, None] * BLOCK_D + dims[None, :],
                                mask=s_mask[:, None] & dim_mask[None, :], other=0.0, cache_modifier=".cg")
                lse_max = tl.max(lse_s, 0)
                weights = tl.exp2(lse_s - tl.where(lse_max == float("-inf"), 0.0, lse_max))
                total = tl.sum(weights, 0)
                merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
                head_offs = req.to(tl.int64) * stride_o_tok + (kv_head * GROUP + h) * stride_o_head
                tl.store(out_ptr + head_offs + dims, merged.to(out_ptr.dtype.element_ty), mask=dim_mask)


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Programs per (request, KV head). Measured on H100 at Llama-3.1-8B shapes: once the batch
    alone gives every SM a program, splitting adds merge work, except that two splits even out
    the last wave at long contexts (batch 32: 3% faster from 8k tokens, equal at 2k, 7% slower at
    512); below that, about two programs per SM, with no split shorter than
    _MIN_TOKENS_PER_SPLIT tokens of the longest context (batch 1: 8 splits at 512 tokens, 32 from
    2k tokens up)."""
    if device.type == "cuda":
        num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        num_sms = 16  # Triton's CPU interpreter: any value is correct
    num_programs = num_decodes * num_kv_heads
    if num_programs >= num_sms:
        return 2 if num_programs < 4 * num_sms and max_seq_len >= 4096 else 1
    wanted = triton.cdiv(2 * num_sms, max(1, num_programs))
    useful = triton.cdiv(max(1, max_seq_len), _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_DECODE_SPLITS))


def _merge_width(num_splits: int) -> int:
    """Split lanes the merge loads at once: two widths only, so two compiled variants serve every
    split count (both compiled while the decode graphs are captured)."""
    return 8 if num_splits <= 8 else triton.next_power_of_2(MAX_DECODE_SPLITS)


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
    config: KernelConfig = DECODE_CONFIG,
    k_scale: float = 1.0,  # fp8 cache only: k = stored * k_scale
    v_scale: float = 1.0,
) -> None:
    num_decodes, num_heads, head_dim = q.shape
    if num_decodes == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    if config is DECODE_CONFIG and q.element_size() > 2:
        config = DECODE_CONFIG_FP32
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    if num_splits is None:
        num_splits = decode_num_splits(num_decodes, num_kv_heads, max_seq_len, q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    direct = num_splits == 1
    if direct:
        part_out = part_lse = counters = out  # not touched by the kernel
    else:
        part_out = torch.empty(num_decodes, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=q.device)
        if split_counters is None:
            split_counters = new_split_counters(num_decodes * num_kv_heads, q.device)
        assert split_counters.numel() >= num_decodes * num_kv_heads and split_counters.dtype == torch.int32
        counters = split_counters
    _paged_decode_kernel[(num_decodes, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse, counters,
        scale * LOG2E, num_splits, group,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        float(k_scale), float(v_scale),
        BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=k_cache.shape[1], BLOCK_N=config.block_n if head_dim <= 128 else min(config.block_n, 32),
        BLOCK_S=_merge_width(num_splits), DIRECT=direct,
        KV_FP8=kv_fp8, KV_SCALED=dequantize_to_float32(kv_fp8, k_scale, v_scale),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
