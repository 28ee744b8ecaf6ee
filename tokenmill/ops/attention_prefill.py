"""Paged prefill: flash attention over a variable-length batch of prefills / prefill chunks.

Keys come from two places: the cached prefix (tokens before this step's chunk, through the block
table) and this step's own K/V, read straight from the `k`/`v` inputs. So a chunk or a
prefix-cache hit attends over its cached prefix, and a fresh prompt never touches the cache at all
(the profile run's one-block dummy cache and slot -1 padding are fine). Grid: (request, tile of
BLOCK_M queries, query head); tiles past a request's query length exit at once. With an fp8 cache
only the prefix is dequantized; this step's own K/V stay exact. With a sliding window (a layer
constant, compiled in) a query tile reads only the keys its queries' windows reach.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import (
    LOG2E,
    LaunchConfig,
    check_cache,
    dequantize_to_float32,
    load_kv_tile,
    online_softmax_step,
)

# Measured on H100 (Llama-3.1-8B heads): 6-8% faster than 64x64 at 8k tokens, equal at 512.
PREFILL_CONFIG = LaunchConfig(block_m=128, block_n=128, num_warps=8, num_stages=2)
# float32 tiles are twice the bytes: 128 x 128 needs 320 KB of shared memory at head_dim 128 (the
# H200 has 227 KB per block), so float32 models (parity tests) use quarter-size tiles.
PREFILL_CONFIG_FP32 = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)


@triton.jit
def _load_new_kv_tile(k_ptr, v_ptr, tok_rows, tok_mask, kv_head, dims, dim_mask,
                      stride_k_tok, stride_k_head, stride_v_tok, stride_v_head):
    """K and V of this step's tokens `tok_rows` (rows of the k/v inputs): [BLOCK_N, BLOCK_D] each."""
    mask = tok_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_ptr + tok_rows[:, None] * stride_k_tok + kv_head * stride_k_head + dims[None, :],
                mask=mask, other=0.0)
    v = tl.load(v_ptr + tok_rows[:, None] * stride_v_tok + kv_head * stride_v_head + dims[None, :],
                mask=mask, other=0.0)
    return k, v


@triton.jit
def _attend_window(
    q, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_row_ptr, q_start, q_len, context_len, rows, m_block,
    kv_head, dims, dim_mask, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, scale_log2, m_i, l_i, acc,
    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr,
    KV_SCALED: tl.constexpr, WINDOW: tl.constexpr,
):
    """The causal sliding-window form: query row r (position context_len + r) sees the keys at
    positions (context_len + r - WINDOW, context_len + r]. Keys start at the tile's first query's
    window, so tiles before it are never read (their blocks may be freed) and the cost per query
    tile is bounded by WINDOW + BLOCK_M keys; every tile is masked (the window's edge crosses them)."""
    first_key = tl.maximum(context_len + m_block * BLOCK_M - WINDOW + 1, 0)  # absolute position
    query_pos = context_len + rows
    # 1) The cached prefix, from the window's first key.
    for start_n in range(first_key, context_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_mask = offs_n < context_len
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, key_mask, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE, KV_FP8, KV_SCALED,
        )
        score_mask = key_mask[None, :] & (offs_n[None, :] > query_pos[:, None] - WINDOW)
        m_i, l_i, acc = online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2)
    # 2) This step's own keys (chunk-relative j: position context_len + j), up to the tile's last query.
    new_end = tl.minimum(q_len, (m_block + 1) * BLOCK_M)
    for start_j in range(tl.maximum(first_key - context_len, 0), new_end, BLOCK_N):
        offs_j = start_j + tl.arange(0, BLOCK_N)
        key_mask = offs_j < q_len
        k, v = _load_new_kv_tile(
            k_ptr, v_ptr, (q_start + offs_j).to(tl.int64), key_mask, kv_head, dims, dim_mask,
            stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        )
        score_mask = (key_mask[None, :] & (offs_j[None, :] <= rows[:, None])
                      & (offs_j[None, :] > rows[:, None] - WINDOW))
        m_i, l_i, acc = online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["first_req", "stride_bt_req"])  # per-step values: see attention_decode.py
def _paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_loc_ptr,
    seq_lens_ptr, out_ptr,
    scale_log2, first_req,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_req, k_scale, v_scale,
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr, WINDOW: tl.constexpr,
):
    req = first_req + tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + req) - q_len  # tokens cached before this step's chunk
    kv_head = head // GROUP
    block_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query indices within the chunk
    row_mask = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if WINDOW > 0:
        m_i, l_i, acc = _attend_window(
            q, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_row_ptr, q_start, q_len, context_len, rows,
            m_block, kv_head, dims, dim_mask, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
            stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, scale_log2, m_i, l_i, acc,
            PAGE, BLOCK_M, BLOCK_N, KV_FP8, KV_SCALED, WINDOW,
        )
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :],
        )
        return

    # 1) The cached prefix: every query of the chunk sees all of it. Whole tiles need no score
    # mask (a per-element select on every tile costs ~10% at long prefixes); the tail tile does.
    prefix_full_end = (context_len // BLOCK_N) * BLOCK_N
    for start_n in range(0, prefix_full_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, offs_n < context_len, kv_head, dims,
            dim_mask, stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE, KV_FP8, KV_SCALED,
        )
        m_i, l_i, acc = online_softmax_step(q, k, v, offs_n[None, :] >= 0, m_i, l_i, acc, scale_log2)
    if prefix_full_end < context_len:
        offs_n = prefix_full_end + tl.arange(0, BLOCK_N)
        key_mask = offs_n < context_len
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, key_mask, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE, KV_FP8, KV_SCALED,
        )
        m_i, l_i, acc = online_softmax_step(q, k, v, key_mask[None, :], m_i, l_i, acc, scale_log2)

    # 2) This step's own keys. Causal: tiles wholly before the tile's first query need no mask.
    if CAUSAL:
        full_end = ((m_block * BLOCK_M) // BLOCK_N) * BLOCK_N
        new_end = tl.minimum(q_len, (m_block + 1) * BLOCK_M)
    else:
        full_end = (q_len // BLOCK_N) * BLOCK_N
        new_end = q_len
    for start_j in range(0, full_end, BLOCK_N):
        offs_j = start_j + tl.arange(0, BLOCK_N)
        k, v = _load_new_kv_tile(
            k_ptr, v_ptr, (q_start + offs_j).to(tl.int64), offs_j < q_len, kv_head, dims, dim_mask,
            stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        )
        m_i, l_i, acc = online_softmax_step(q, k, v, offs_j[None, :] >= 0, m_i, l_i, acc, scale_log2)
    for start_j in range(full_end, new_end, BLOCK_N):
        offs_j = start_j + tl.arange(0, BLOCK_N)
        key_mask = offs_j < q_len
        k, v = _load_new_kv_tile(
            k_ptr, v_ptr, (q_start + offs_j).to(tl.int64), key_mask, kv_head, dims, dim_mask,
            stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        )
        score_mask = key_mask[None, :]
        if CAUSAL:
            score_mask = score_mask & (offs_j[None, :] <= rows[:, None])
        m_i, l_i, acc = online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :],
    )


def paged_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]; rows of requests >= first_req are read
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], this step's keys (any token/head strides)
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]; read for prefixes only
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, cached prefix + this step's tokens
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], written for the same rows
    first_req: int,
    num_reqs: int,
    max_query_len: int,
    scale: float,
    causal: bool = True,
    config: LaunchConfig = PREFILL_CONFIG,
    k_scale: float = 1.0,  # fp8 cache only: k = stored * k_scale (the cached prefix)
    v_scale: float = 1.0,
    sliding_window: int | None = None,  # causal only: query p attends keys (p - window, p]
) -> None:
    """Attention for requests `first_req : first_req + num_reqs`: each attends over its cached
    prefix (`seq_len - query_len` tokens, from the cache) and, causally, over its own new tokens
    (from k/v); with a sliding window, over the keys in each query's window only."""
    if num_reqs == 0:
        return
    assert sliding_window is None or (causal and sliding_window >= 1), "a window is causal and >= 1"
    kv_fp8 = check_cache(k_cache, v_cache)
    if config is PREFILL_CONFIG and q.element_size() > 2:
        config = PREFILL_CONFIG_FP32
    num_heads, head_dim = q.shape[1:]
    group = num_heads // k_cache.shape[2]
    assert group * k_cache.shape[2] == num_heads, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    grid = (num_reqs, triton.cdiv(max_query_len, config.block_m), num_heads)
    _paged_prefill_kernel[grid](
        q, k, v, k_cache, v_cache, block_table, query_start_loc, seq_lens, out,
        scale * LOG2E, first_req,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        float(k_scale), float(v_scale),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=k_cache.shape[1], BLOCK_M=config.block_m, BLOCK_N=config.block_n, CAUSAL=causal,
        KV_FP8=kv_fp8, KV_SCALED=dequantize_to_float32(kv_fp8, k_scale, v_scale), WINDOW=sliding_window or 0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
