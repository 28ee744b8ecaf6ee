"""Paged multi-head latent attention (MLA) decode with split-KV, beside its torch reference.

With DeepSeek's up-projections absorbed (model/attention/mla.py), one decode token of head h
attends over the cached rows `[latent (D_LATENT) | rope key (D_ROPE)]` of its request as
multi-query attention: the score of row j is `q_latent[h] . latent[j] + q_pe[h] . rope_key[j]`
and the value is `latent[j]` itself. Every head reads the same rows, so a program takes a block of
BLOCK_H heads and reads each cache tile once for all of them (`tl.dot` over the head block).

Grid: (request, head block, split). The context of a request is cut into `num_splits` ranges of
whole tiles; each program writes its range's normalised output and log2-sum-exp as a partial
(every split writes its lane, an empty one with weight 0), and a second kernel merges the lanes
per (request, head). With one split the first kernel writes the output directly.

The cache is `[num_blocks, block_size, D_LATENT + D_ROPE]` in the model dtype or float8_e4m3fn
(one scale for the layer, `kv_quant.py`'s format). The split count is a Python int from batch
size, head count and `max_seq_len`; the ranges come from the real `seq_lens` on the device, so a
CUDA graph captured once replays correctly for any shorter context, and a padding request
(seq_len 0) gets a zero output.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import LOG2E, LaunchConfig, finish_softmax, model_dot
from tokenmill.ops.attention_decode import decode_num_splits
from tokenmill.ops.kv_quant import is_fp8, read_kv

# 32-token tiles of 576 bf16 values (36 KB) double-buffered, with a [16, 512] float32 accumulator:
# the tile vLLM's Triton MLA decode uses on CUDA for these head sizes.
MLA_DECODE_CONFIG = LaunchConfig(block_m=16, block_n=32, num_warps=4, num_stages=2)
# float32 tiles are twice the bytes (parity tests run float32 models).
MLA_DECODE_CONFIG_FP32 = LaunchConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


def mla_decode_ref(
    q_latent: torch.Tensor,  # [num_decodes, num_heads, d_latent]
    q_pe: torch.Tensor,  # [num_decodes, num_heads, d_rope]
    cache: torch.Tensor,  # [num_blocks, block_size, d_latent + d_rope]
    block_table: torch.Tensor,  # [>= num_decodes, max_blocks] int32
    seq_lens: torch.Tensor,  # [>= num_decodes] int32
    scale: float,
    kv_scale: float = 1.0,
) -> torch.Tensor:  # [num_decodes, num_heads, d_latent], float32
    """The reference: each request's rows gathered and attended in float32, one at a time."""
    d_latent = q_latent.shape[-1]
    block_size = cache.shape[1]
    out = torch.zeros(q_latent.shape, dtype=torch.float32, device=q_latent.device)
    for i, seq_len in enumerate(seq_lens[: q_latent.shape[0]].tolist()):
        if seq_len == 0:
            continue
        blocks = block_table[i, : (seq_len + block_size - 1) // block_size].long()
        rows = read_kv(cache[blocks].reshape(-1, cache.shape[-1])[:seq_len], kv_scale, torch.float32)
        scores = (q_latent[i].float() @ rows[:, :d_latent].T + q_pe[i].float() @ rows[:, d_latent:].T) * scale
        out[i] = torch.softmax(scores, dim=-1) @ rows[:, :d_latent]
    return out


@triton.jit(do_not_specialize=["num_splits", "stride_bt_req"])  # per-step values: see attention_decode.py
def _mla_decode_kernel(
    q_latent_ptr, q_pe_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2, kv_scale, num_heads, num_splits,
    stride_ql_tok, stride_ql_head, stride_qp_tok, stride_qp_head, stride_o_tok, stride_o_head,
    stride_c_block, stride_c_slot, stride_bt_req,
    D_LATENT: tl.constexpr, D_ROPE: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_H: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr,
):
    req = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req)
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles, num_splits), 1)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)

    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = heads < num_heads
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    dl_mask = dl < D_LATENT
    dr_mask = dr < D_ROPE
    q_lat = tl.load(q_latent_ptr + req.to(tl.int64) * stride_ql_tok + heads[:, None] * stride_ql_head + dl[None, :],
                    mask=h_mask[:, None] & dl_mask[None, :], other=0.0)
    q_pe = tl.load(q_pe_ptr + req.to(tl.int64) * stride_qp_tok + heads[:, None] * stride_qp_head + dr[None, :],
                   mask=h_mask[:, None] & dr_mask[None, :], other=0.0)
    block_row_ptr = block_table_ptr + req.to(tl.int64) * stride_bt_req

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DL], tl.float32)
    for tile in range(tile_begin, tile_end):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_mask = offs_n < seq_len
        block_ids = tl.load(block_row_ptr + offs_n // PAGE, mask=key_mask, other=0).to(tl.int64)
        rows = block_ids * stride_c_block + (offs_n % PAGE) * stride_c_slot
        latent = tl.load(cache_ptr + rows[:, None] + dl[None, :], mask=key_mask[:, None] & dl_mask[None, :],
                         other=0.0)
        rope_key = tl.load(cache_ptr + rows[:, None] + D_LATENT + dr[None, :],
                           mask=key_mask[:, None] & dr_mask[None, :], other=0.0)
        if KV_FP8 and KV_SCALED:  # (unit scales: e4m3 values convert exactly to the model dtype)
            latent = latent.to(tl.float32) * kv_scale
            rope_key = rope_key.to(tl.float32) * kv_scale
        latent = latent.to(q_lat.dtype)
        s = model_dot(q_lat, tl.trans(latent)) + model_dot(q_pe, tl.trans(rope_key.to(q_pe.dtype)))
        s = tl.where(key_mask[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw only masked keys
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + model_dot(p.to(latent.dtype), latent)
        m_i = m_new

    out, lse = finish_softmax(m_i, l_i, acc)
    out_mask = h_mask[:, None] & dl_mask[None, :]
    if DIRECT:
        tl.store(out_ptr + req.to(tl.int64) * stride_o_tok + heads[:, None] * stride_o_head + dl[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_out [num_decodes, num_heads, num_splits, BLOCK_DL], part_lse without the last axis.
        lanes = (req.to(tl.int64) * num_heads + heads) * num_splits + split  # [BLOCK_H]
        tl.store(part_out_ptr + lanes[:, None] * BLOCK_DL + dl[None, :], out, mask=out_mask)
        tl.store(part_lse_ptr + lanes, lse, mask=h_mask)


@triton.jit
def _mla_merge_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits, stride_o_tok, stride_o_head,
    D_LATENT: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """One (request, head): the weighted mean of its split lanes (log2 domain). All lanes empty
    (a padding request) gives 0."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    s = tl.arange(0, BLOCK_S)
    dl = tl.arange(0, BLOCK_DL)
    s_mask = s < num_splits
    lanes = (req.to(tl.int64) * num_heads + head) * num_splits + s
    lse = tl.load(part_lse_ptr + lanes, mask=s_mask, other=float("-inf"))
    parts = tl.load(part_out_ptr + lanes[:, None] * BLOCK_DL + dl[None, :],
                    mask=s_mask[:, None] & (dl[None, :] < D_LATENT), other=0.0)
    lse_max = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(lse_max == float("-inf"), 0.0, lse_max))
    total = tl.sum(weights, 0)
    merged = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + req.to(tl.int64) * stride_o_tok + head * stride_o_head + dl,
             merged.to(out_ptr.dtype.element_ty), mask=dl < D_LATENT)


def mla_decode(
    q_latent: torch.Tensor,  # [num_decodes, num_heads, d_latent], any token/head strides
    q_pe: torch.Tensor,  # [num_decodes, num_heads, d_rope], rotated
    cache: torch.Tensor,  # [num_blocks, block_size, d_latent + d_rope]
    block_table: torch.Tensor,  # [>= num_decodes, max_blocks] int32
    seq_lens: torch.Tensor,  # [>= num_decodes] int32; 0 gives a zero output (padding)
    out: torch.Tensor,  # [num_decodes, num_heads, d_latent], any token/head strides
    max_seq_len: int,  # an upper bound of seq_lens; sizes the split count only
    scale: float,
    kv_scale: float = 1.0,  # fp8 cache only: value = stored * kv_scale
    num_splits: int | None = None,
    config: LaunchConfig | None = None,
) -> None:
    """Latent attention of one query token per request over its cached rows (module docstring)."""
    num_decodes, num_heads, d_latent = q_latent.shape
    if num_decodes == 0:
        return
    d_rope = q_pe.shape[-1]
    assert cache.shape[-1] == d_latent + d_rope and cache.stride(-1) == 1
    assert q_latent.stride(-1) == 1 and q_pe.stride(-1) == 1 and out.stride(-1) == 1
    if config is None:
        config = MLA_DECODE_CONFIG_FP32 if q_latent.element_size() > 2 else MLA_DECODE_CONFIG
    block_h = config.block_m
    head_blocks = triton.cdiv(num_heads, block_h)
    if num_splits is None:
        num_splits = decode_num_splits(num_decodes, head_blocks, max_seq_len, q_latent.device)
    block_dl = max(16, triton.next_power_of_2(d_latent))
    kv_fp8 = is_fp8(cache)
    direct = num_splits == 1
    if direct:
        part_out = part_lse = out  # not touched by the kernel
    else:
        part_out = torch.empty(num_decodes, num_heads, num_splits, block_dl, dtype=torch.float32,
                               device=q_latent.device)
        part_lse = torch.empty(num_decodes, num_heads, num_splits, dtype=torch.float32, device=q_latent.device)
    _mla_decode_kernel[(num_decodes, head_blocks, num_splits)](
        q_latent, q_pe, cache, block_table, seq_lens, out, part_out, part_lse,
        scale * LOG2E, float(kv_scale), num_heads, num_splits,
        q_latent.stride(0), q_latent.stride(1), q_pe.stride(0), q_pe.stride(1), out.stride(0), out.stride(1),
        cache.stride(0), cache.stride(1), block_table.stride(0),
        D_LATENT=d_latent, D_ROPE=d_rope, BLOCK_DL=block_dl, BLOCK_DR=max(16, triton.next_power_of_2(d_rope)),
        BLOCK_H=block_h, PAGE=cache.shape[1], BLOCK_N=config.block_n, DIRECT=direct,
        KV_FP8=kv_fp8, KV_SCALED=kv_fp8 and kv_scale != 1.0,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if not direct:
        block_s = max(2, triton.next_power_of_2(num_splits))
        _mla_merge_kernel[(num_decodes, num_heads)](
            part_out, part_lse, out, num_splits, out.stride(0), out.stride(1),
            D_LATENT=d_latent, BLOCK_DL=block_dl, BLOCK_S=block_s,
            num_warps=8 if block_s * block_dl > 4096 else 4,  # the [BLOCK_S, BLOCK_DL] float32 tile
        )
