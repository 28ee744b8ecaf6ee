"""Batch-invariant paged attention: one kernel for prefills, chunks and decodes, in which a query's
result depends only on its own keys, never on its batch (docs/rl.md).

The split-KV decode kernel sizes its splits from the batch, and the prefill kernel walks the
cached prefix and the chunk's own keys separately (where the chunk starts moves its tile
boundaries), so the same token's attention changes in the last bits with what else is scheduled,
how its prompt was chunked, and whether it was decoded or recomputed after a preemption. Here the
step's K/V are in the cache first (the backend writes them), and every query row walks its keys
[0, position] from the cache in tiles of BLOCK_N aligned at position 0, folding them into an
online softmax in that order. Rows are independent (the dot products of one row do not see the
others), a tile past a row's last key is an exact no-op (weight exp(-inf) = 0, rescale exp(0) =
1), and one launch configuration (per dtype) serves every call, so prefill and decode rows run
the same instruction sequence.

Grid: (request, tile of BLOCK_M queries, query head). A decode uses one row of its tile: slower
than split-KV at long contexts and small batches, which is the mode's cost.

`batch_invariant_attention_ref` is the plain reference it is tested against.
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

# Fixed per dtype (never per call): the instruction sequence must not change with the batch.
CONFIG = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
CONFIG_FP32 = LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=2)


def batch_invariant_attention_ref(q, k_cache, v_cache, block_table, query_start_loc, seq_lens, scale,
                                  k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """Causal attention of each request's queries over its cached keys, in float32 (test reference).
    Shapes as `batch_invariant_attention`; returns [num_tokens, num_heads, head_dim] in q's dtype."""
    out = torch.zeros_like(q)
    page, kv_heads, head_dim = k_cache.shape[1:]
    group = q.shape[1] // kv_heads
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for i, seq_len in enumerate(lens):
        start, end = starts[i], starts[i + 1]
        if end == start or seq_len == 0:
            continue
        blocks = block_table[i, : -(-seq_len // page)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].float() * k_scale
        v = v_cache[blocks].reshape(-1, kv_heads, head_dim)[:seq_len].float() * v_scale
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), k) * scale
        query_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)
        scores.masked_fill_(torch.arange(seq_len, device=q.device)[None, :] > query_pos[:, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out


@triton.jit(do_not_specialize=["stride_bt_req"])
def _attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale_log2, stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_req, k_scale, v_scale,
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr,
):
    req = tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    context_len = tl.load(seq_lens_ptr + req) - q_len
    kv_head = head // GROUP
    block_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    # Row r attends keys [0, context_len + r]; the tile's last row sees the most.
    key_end = context_len + rows + 1  # [BLOCK_M]
    tile_end = context_len + tl.minimum(q_len, (m_block + 1) * BLOCK_M)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, tile_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, offs_n < tile_end, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE, KV_FP8, KV_SCALED,
        )
        score_mask = offs_n[None, :] < key_end[:, None]
        m_i, l_i, acc = online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def batch_invariant_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], the step's K/V written
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, context after this step
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    num_reqs: int,
    max_query_len: int,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Causal attention of every request's new queries over its keys in the cache."""
    if num_reqs == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    config = CONFIG_FP32 if q.element_size() > 2 else CONFIG
    num_heads, head_dim = q.shape[1:]
    group = num_heads // k_cache.shape[2]
    assert group * k_cache.shape[2] == num_heads, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    grid = (num_reqs, triton.cdiv(max_query_len, config.block_m), num_heads)
    _attention_kernel[grid](
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens, out,
        scale * LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        float(k_scale), float(v_scale),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=k_cache.shape[1], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        KV_FP8=kv_fp8, KV_SCALED=dequantize_to_float32(kv_fp8, k_scale, v_scale),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
