"""Triton kernels of the `triton` attention backend, and the Python launchers around them.

Layouts follow `backend.py`: q/out `[num_tokens, num_heads, head_dim]`, k/v
`[num_tokens, num_kv_heads, head_dim]` (any token/head strides, last dim contiguous), K/V caches
`[num_blocks, block_size, num_kv_heads, head_dim]`, block table `[num_reqs, max_blocks]` int32.

Three kernels:
- `write_kv_cache`: scatters the step's K/V into their slots (slot -1 = skip, for padding tokens).
- `paged_prefill`: flash-attention over a variable-length batch of prefills / prefill chunks. Every
  key is read from the paged cache (the step's own K/V were written there first), so a chunk or a
  prefix-cache hit attends over its cached prefix with no special case.
- `paged_decode`: flash-decoding. The context of each (request, KV head) is cut into `num_splits`
  contiguous ranges handled by separate programs, each writing a normalised partial output and
  its log-sum-exp; a reduce kernel merges them. One program serves all query heads of a KV head
  group, so each K/V block is read from memory once per group, not once per query head.

All launchers size their grids from Python ints (batch sizes, `max_seq_len`) and never read device
values on the host, so the decode path can be captured in a CUDA graph. The split ranges are
computed on the device from the actual `seq_lens`, so the result is right for any length; the
split count only decides how well the GPU is filled.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# exp2 is one instruction on the GPU; exp(x) = exp2(x * log2(e)).
_LOG2E = 1.4426950408889634
# The partial-result buffers have room for this many splits per (request, head).
MAX_DECODE_SPLITS = 32
# A split shorter than this many tokens costs more in the reduce than it saves.
_MIN_TOKENS_PER_SPLIT = 256


# ---------------------------------------------------------------------------------------------
# KV-cache write
# ---------------------------------------------------------------------------------------------


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    src_k = k_ptr + tok.to(tl.int64) * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :]
    src_v = v_ptr + tok.to(tl.int64) * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :]
    dst = (slot // PAGE) * stride_c_block + (slot % PAGE) * stride_c_slot
    dst_offs = dst + heads[:, None] * stride_c_head + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    tl.store(k_cache_ptr + dst_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_cache(k_cache, v_cache)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v need a contiguous last dim"
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )


# ---------------------------------------------------------------------------------------------
# Shared: one key/value tile of online softmax
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_kv_tile(
    k_cache_ptr, v_cache_ptr, block_row_ptr, token_offs, token_mask, kv_head, dims, dim_mask,
    stride_c_block, stride_c_slot, stride_c_head, PAGE: tl.constexpr,
):
    """K and V of the tokens `token_offs` of one request and one KV head: [BLOCK_N, BLOCK_D] each."""
    block_ids = tl.load(block_row_ptr + token_offs // PAGE, mask=token_mask, other=0).to(tl.int64)
    rows = block_ids * stride_c_block + (token_offs % PAGE) * stride_c_slot + kv_head * stride_c_head
    offs = rows[:, None] + dims[None, :]
    mask = token_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_cache_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=mask, other=0.0)
    return k, v


@triton.jit
def _online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2):
    """Fold one tile into the running (max, sum, accumulator); scores in the log2 domain."""
    s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale_log2
    s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 there so no NaN appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


# ---------------------------------------------------------------------------------------------
# Paged prefill
# ---------------------------------------------------------------------------------------------


@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, query_start_loc_ptr, seq_lens_ptr, out_ptr,
    scale_log2, first_req,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_req,
    GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
):
    req = first_req + tl.program_id(0)
    m_block = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    context_len = seq_len - q_len  # tokens cached before this step's chunk
    kv_head = head // GROUP
    block_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < q_len
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )
    q_pos = context_len + rows  # absolute positions of the queries

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if CAUSAL:
        # Keys before the tile's first query are visible to every row: no mask needed there.
        full_end = ((context_len + m_block * BLOCK_M) // BLOCK_N) * BLOCK_N
        kv_end = tl.minimum(seq_len, context_len + (m_block + 1) * BLOCK_M)
    else:
        full_end = (seq_len // BLOCK_N) * BLOCK_N
        kv_end = seq_len
    for start_n in range(0, full_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, offs_n < seq_len, kv_head, dims,
            dim_mask, stride_c_block, stride_c_slot, stride_c_head, PAGE,
        )
        m_i, l_i, acc = _online_softmax_step(q, k, v, offs_n[None, :] >= 0, m_i, l_i, acc, scale_log2)
    for start_n in range(full_end, kv_end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_mask = offs_n < seq_len
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, key_mask, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, PAGE,
        )
        score_mask = key_mask[None, :]
        if CAUSAL:
            score_mask = score_mask & (offs_n[None, :] <= q_pos[:, None])
        m_i, l_i, acc = _online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_o_tok + head * stride_o_head + dims[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :],
    )


def paged_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]; rows of requests >= first_req are read
    k_cache: torch.Tensor,
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
) -> None:
    """Attention for requests `first_req : first_req + num_reqs`, whose K/V are already cached."""
    if num_reqs == 0:
        return
    _check_cache(k_cache, v_cache)
    num_heads, head_dim = q.shape[1:]
    group = num_heads // k_cache.shape[2]
    assert group * k_cache.shape[2] == num_heads, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    block_m, block_n = 64, 64
    grid = (num_reqs, triton.cdiv(max_query_len, block_m), num_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, block_table, query_start_loc, seq_lens, out,
        scale * _LOG2E, first_req,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        PAGE=k_cache.shape[1], BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal,
        num_warps=4, num_stages=3,
    )


# ---------------------------------------------------------------------------------------------
# Paged decode (split-KV)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _paged_decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, num_splits,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_c_head, stride_bt_req,
    stride_p_req, stride_p_head, stride_p_split,  # of part_out [num_decodes, num_heads, splits, BLOCK_D]
    GROUP, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    # The GROUP query heads that share this KV head, padded to BLOCK_H rows for tl.dot.
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
        k, v = _load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, key_mask, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, PAGE,
        )
        m_i, l_i, acc = _online_softmax_step(q, k, v, key_mask[None, :], m_i, l_i, acc, scale_log2)

    # An empty split (or a padding request with seq_len 0) leaves l = 0: output 0, lse = -inf.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if DIRECT:
        tl.store(
            out_ptr + req.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head + dims[None, :],
            out.to(out_ptr.dtype.element_ty), mask=qh_mask,
        )
    else:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        part = req.to(tl.int64) * stride_p_req + heads * stride_p_head + split * stride_p_split
        tl.store(part_out_ptr + part[:, None] + dims[None, :], out, mask=qh_mask)
        # part_lse is contiguous [num_decodes, num_heads, num_splits].
        lse_offs = (req.to(tl.int64) * (GROUP * tl.num_programs(1)) + heads) * num_splits + split
        tl.store(part_lse_ptr + lse_offs, lse, mask=h_mask)


@triton.jit
def _paged_decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, num_heads,
    stride_o_tok, stride_o_head, stride_p_req, stride_p_head, stride_p_split,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    part = req.to(tl.int64) * stride_p_req + head * stride_p_head + splits * stride_p_split
    lse_offs = (req.to(tl.int64) * num_heads + head) * num_splits + splits
    lse = tl.load(part_lse_ptr + lse_offs, mask=split_mask, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)  # 0 for empty splits
    total = tl.sum(weights, 0)
    parts = tl.load(
        part_out_ptr + part[:, None] + dims[None, :],
        mask=split_mask[:, None] & (dims[None, :] < HEAD_DIM), other=0.0,
    )
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(
        out_ptr + req.to(tl.int64) * stride_o_tok + head * stride_o_head + dims,
        out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM,
    )


@functools.lru_cache(maxsize=8)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_decodes: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """How many programs share one (request, KV head): enough to give every SM two programs, but
    no split shorter than _MIN_TOKENS_PER_SPLIT tokens of the longest context."""
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 16
    wanted = triton.cdiv(2 * num_sms, max(1, num_decodes * num_kv_heads))
    useful = triton.cdiv(max(1, max_seq_len), _MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_DECODE_SPLITS))


def paged_decode(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim], one query token per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= num_decodes, max_blocks] int32; row i is request i
    seq_lens: torch.Tensor,  # [>= num_decodes] int32; 0 gives a zero output (padding)
    out: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    max_seq_len: int,  # an upper bound of seq_lens; sizes the split count only
    scale: float,
    num_splits: int | None = None,
) -> None:
    num_decodes, num_heads, head_dim = q.shape
    if num_decodes == 0:
        return
    _check_cache(k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    assert group * num_kv_heads == num_heads, "num_heads must be a multiple of num_kv_heads"
    assert q.stride(-1) == 1 and out.stride(-1) == 1
    if num_splits is None:
        num_splits = decode_num_splits(num_decodes, num_kv_heads, max_seq_len, q.device)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 64 if head_dim <= 128 else 32
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # unused by the kernel
        p_strides = (0, 0, block_d)
    else:
        part_out = torch.empty(num_decodes, num_heads, num_splits, block_d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=q.device)
        p_strides = part_out.stride()[:3]
    _paged_decode_split_kernel[(num_decodes, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse,
        scale * _LOG2E, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_table.stride(0),
        *p_strides,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=block_d, PAGE=k_cache.shape[1], BLOCK_N=block_n, DIRECT=direct,
        num_warps=4, num_stages=3,
    )
    if not direct:
        _paged_decode_reduce_kernel[(num_decodes, num_heads)](
            part_out, part_lse, out, num_splits, num_heads,
            out.stride(0), out.stride(1), *p_strides,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(num_splits),
            num_warps=4,
        )


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        "k_cache and v_cache must share shape and strides"
    assert k_cache.stride(-1) == 1, "the cache's head_dim must be contiguous"
