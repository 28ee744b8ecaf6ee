"""Cascade attention: a decode batch whose requests all start with the same KV blocks.

With prefix caching, the requests of a batch often share their first blocks: one system prompt
or document before different questions, or the prompt of `n > 1` samples. The plain decode kernel
reads those blocks once per request. At 128 requests of ~2k tokens sharing 1,536 (the prefix
benchmark at 75% hit, H200) it takes 190 us a layer, against 80 us to read each distinct block
once: the copies come from L2, whose bandwidth is then the limit (docs/perf-kernels.md).

Cascade attention splits each context in two:

1. `_shared_prefix_kernel` attends the queries of many requests to the shared prefix at once. A
   program takes one KV head and a chunk of requests, all their query heads of that KV head as
   the rows of one tile (BLOCK_M = 64: 16 requests at group 4), so each prefix tile is read once
   per chunk and feeds tensor-core dots 64 rows tall, where the decode kernel has its group padded
   to 16. The prefix is cut into `num_lanes - 1` ranges, one program each, for parallelism; each
   writes its normalised partial output and log-sum-exp into its lane.
2. The decode kernel in its cascade form (`launch_decode_kernel(prefix_len=...)`) attends each
   request over the rest of its context, writes that as the last lane and merges all the lanes
   (log-sum-exp weights, as its split merge does).

Both kernels read the prefix length from the device (one int32), so a CUDA graph captured once
serves every length; at 0 the prefix kernel returns at once and the decode kernel writes its
output directly. The result equals plain decode up to float rounding. The caller guarantees that
the first `prefix_len` tokens of every request in the batch sit in the same blocks as row 0's
(`common_prefix_len` in the model runner), and that each request has at least one token past it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import (
    LOG2E,
    LaunchConfig,
    attend_kv_range,
    check_cache,
    dequantize_to_float32,
    finish_softmax,
)
from tokenmill.ops.attention_decode import (
    DECODE_CONFIG,
    launch_decode_kernel,
    new_partials,
    sm_count,
)

PREFIX_CONFIG = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=3)
# float32 tiles are twice the bytes: two stages keep a program's shared memory at ~160 KB.
PREFIX_CONFIG_FP32 = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
# Prefix lanes at most: with the decode program's own lane, 8 lanes, the decode kernel's narrow
# merge width (one compiled variant for every lane count).
MAX_PREFIX_SPLITS = 7


@triton.jit(do_not_specialize=["num_decodes", "num_lanes", "stride_q_tok"])
def _shared_prefix_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, prefix_len_ptr, part_out_ptr, part_lse_ptr,
    num_decodes, num_lanes, scale_log2, GROUP,
    stride_q_tok, stride_q_head, stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale,
    REQS: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr,
):
    chunk = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    prefix_len = tl.load(prefix_len_ptr)
    if prefix_len == 0:
        return  # no shared prefix this step: the decode kernel neither reads nor waits for lanes
    num_tiles = tl.cdiv(prefix_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    # Row r of the tile: query head r % GROUP of KV head `kv_head`, of request chunk*REQS + r // GROUP.
    rows = tl.arange(0, BLOCK_M)
    reqs = chunk * REQS + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < REQS * GROUP) & (reqs < num_decodes)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + reqs.to(tl.int64)[:, None] * stride_q_tok + heads[:, None] * stride_q_head + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # The prefix's blocks are the same in every row of the table: row 0's serve the chunk.
    m_i, l_i, acc = attend_kv_range(
        q, k_cache_ptr, v_cache_ptr, block_table_ptr, 0, tile_begin, tile_end, prefix_len, kv_head, dims,
        dim_mask, stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, scale_log2, m_i, l_i, acc,
        PAGE, BLOCK_N, KV_FP8, KV_SCALED,
    )
    # An empty range (more splits than tiles) writes lse -inf and zeros: weight 0 in the merge.
    out, lse = finish_softmax(m_i, l_i, acc)
    lanes = (reqs.to(tl.int64) * (GROUP * num_kv_heads) + heads) * num_lanes + split
    tl.store(part_out_ptr + lanes[:, None] * BLOCK_D + dims[None, :], out,
             mask=row_mask[:, None] & dim_mask[None, :])
    tl.store(part_lse_ptr + lanes, lse, mask=row_mask)


def prefix_num_splits(num_decodes: int, num_kv_heads: int, group: int, device: torch.device) -> int:
    """Prefix ranges per (request chunk, KV head): about two programs per SM (two fit at once),
    at most MAX_PREFIX_SPLITS. Measured on an H200 at Llama-3.1-8B shapes, 1,536 shared tokens
    (docs/perf.md): at 128 requests (8 chunks x 8 KV heads) 1-7 splits took 130/114/111/109/117/
    117/118 us, this gives 4; at 64 requests 88/71/66/63/63/62/63, this gives 7."""
    _, reqs = _chunk_shape(group)
    programs = triton.cdiv(num_decodes, reqs) * num_kv_heads
    return max(1, min(MAX_PREFIX_SPLITS, 2 * sm_count(device) // programs))


def _chunk_shape(group: int, block_m: int = PREFIX_CONFIG.block_m) -> tuple[int, int]:
    """(BLOCK_M, requests per program): `block_m` rows of whole groups (one request for wider
    groups)."""
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m, block_m // group


def cascade_decode(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= num_decodes, max_blocks] int32
    seq_lens: torch.Tensor,  # [>= num_decodes] int32
    prefix_len: torch.Tensor,  # [1] int32 on the device: tokens shared by every row (0: none)
    out: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    scale: float,
    num_prefix_splits: int | None = None,
    config: LaunchConfig = DECODE_CONFIG,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    prefix_block_m: int = PREFIX_CONFIG.block_m,
) -> None:
    """Decode attention in two launches, the shared prefix for all requests at once, then each
    request's own tokens and the merge (module docstring). Host ints only: graph-capturable."""
    num_decodes, num_heads, head_dim = q.shape
    if num_decodes == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_prefix_splits is None:
        num_prefix_splits = prefix_num_splits(num_decodes, num_kv_heads, group, q.device)
    assert 1 <= num_prefix_splits <= MAX_PREFIX_SPLITS
    assert prefix_len.dtype == torch.int32 and prefix_len.numel() == 1
    num_lanes = num_prefix_splits + 1
    part_out, part_lse = new_partials(num_decodes, num_heads, num_lanes, q)
    block_m, reqs = _chunk_shape(group, prefix_block_m)
    cfg = PREFIX_CONFIG if q.element_size() <= 2 else PREFIX_CONFIG_FP32
    _shared_prefix_kernel[(triton.cdiv(num_decodes, reqs), num_kv_heads, num_prefix_splits)](
        q, k_cache, v_cache, block_table, prefix_len, part_out, part_lse,
        num_decodes, num_lanes, scale * LOG2E, group,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        float(k_scale), float(v_scale),
        REQS=reqs, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_D=part_out.shape[-1], PAGE=k_cache.shape[1],
        BLOCK_N=cfg.block_n if head_dim <= 128 else min(cfg.block_n, 32),
        KV_FP8=kv_fp8, KV_SCALED=dequantize_to_float32(kv_fp8, k_scale, v_scale),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    launch_decode_kernel(q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse, out,
                         num_lanes, scale, config, k_scale, v_scale, prefix_len=prefix_len)
