"""Writing the step's K/V into the paged cache, as Triton kernels.

Layouts: k/v `[num_tokens, num_kv_heads, head_dim]` (any token/head strides, last dim contiguous),
K/V caches `[num_blocks, block_size, num_kv_heads, head_dim]`, slot mapping `[num_tokens]` int64.

- `write_kv_cache`: scatters the step's K/V into their slots (slot -1 = skip, for padding); into an
  fp8 cache as `(x / scale).clamp(-448, 448)`, the format of `kv_quant.py`.
- `rope_and_write_kv_cache`: `rope_neox_` (`rotary.py`) on q and k in place, then
  `write_kv_cache`, in one launch instead of two (a launch per layer saved at decode); the
  results are bit-identical to the two ops run in turn. Given Qwen3's per-head q/k RMSNorm
  weights it normalises q and k first, bit-identical to `rms_norm` (`rms_norm.py`) on each: one
  launch a layer where the norms would add two. Each value goes from its load through the norm,
  the rotation and the cache's conversion in registers, so the launch is one round trip to
  memory, where running the ops' bodies in turn would store and reload between them.

Launchers size their grids from Python ints and never read device values on the host, so they can
be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import FP8_MAX, check_cache
from tokenmill.ops.pdl import launch_options, pdl_enter
from tokenmill.ops.rms_norm import sum_of_squares
from tokenmill.ops.rotary import cos_sin_at, rope_launch_meta, rotate_halves


@triton.jit
def _cache_value(x, scale, cache_ptr, KV_FP8: tl.constexpr):
    """A K or V value as the cache stores it: into an fp8 cache saturated rather than overflowing,
    `div_rn` rounding like torch's x / scale (a bit-equal cache)."""
    if KV_FP8:
        x = tl.clamp(tl.div_rn(x.to(tl.float32), scale), -FP8_MAX, FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
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
    tl.store(k_cache_ptr + dst_offs, _cache_value(k, k_scale, k_cache_ptr, KV_FP8), mask=mask)
    tl.store(v_cache_ptr + dst_offs, _cache_value(v, v_scale, v_cache_ptr, KV_FP8), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip
    k_scale: float = 1.0,  # fp8 cache only: stored = k / k_scale
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v need a contiguous last dim"
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8, num_warps=4,
    )


@triton.jit
def _normalised(x, rstd, weight_ptr, offs, mask, dtype: tl.constexpr):
    """`rms_norm.store_normalised`'s value, in float32: rounded to the model dtype before the
    weight multiply and after it, as HF does."""
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return ((x * rstd).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)


@triton.jit
def _rope_heads(x_ptr, stride_head, num_heads, cos, sin, norm_w_ptr, head_dim, eps,
                cache_ptr, cache_row, slot, stride_c_head, scale,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr,
                QK_NORM: tl.constexpr, TO_CACHE: tl.constexpr, KV_FP8: tl.constexpr):
    """One token's heads (rows `stride_head` apart from `x_ptr`): RMSNorm'd (QK_NORM), rotated,
    stored in place and, with TO_CACHE where the token has a slot (`slot` >= 0), into the cache row at
    `cache_row`, all from registers: one round trip to memory. The values are those of `rms_norm`
    (the same sum order and rounding), then `rotary.rotate_halves` of them, then the
    cache's conversion (`_cache_value`)."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    halves = tl.arange(0, BLOCK_HALF)[None, :]
    half_mask = (heads < num_heads) & (halves < HALF)
    first = x_ptr + heads * stride_head + halves
    x1 = tl.load(first, mask=half_mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=half_mask, other=0.0).to(tl.float32)
    # Dims past the rotary ones (partial rotary) pass through the rotation; with the norm they change.
    cols = tl.arange(0, BLOCK_D)[None, :]
    row_mask = (heads < num_heads) & (cols < head_dim)
    tail_mask = row_mask & (cols >= 2 * HALF)
    if QK_NORM:
        row = tl.load(x_ptr + heads * stride_head + cols, mask=row_mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(sum_of_squares(row, BLOCK_HEADS, BLOCK_D) / head_dim + eps)[:, None]
        x1 = _normalised(x1, rstd, norm_w_ptr, halves, halves < HALF, dtype)
        x2 = _normalised(x2, rstd, norm_w_ptr, HALF + halves, halves < HALF, dtype)
        if 2 * HALF < BLOCK_D:
            tail = _normalised(row, rstd, norm_w_ptr, cols, cols < head_dim, dtype).to(dtype)
            tl.store(x_ptr + heads * stride_head + cols, tail, mask=tail_mask)
    elif TO_CACHE and 2 * HALF < BLOCK_D:
        tail = tl.load(x_ptr + heads * stride_head + cols, mask=tail_mask, other=0.0)
    out1, out2 = rotate_halves(x1, x2, cos, sin, dtype)
    tl.store(first, out1, mask=half_mask)
    tl.store(first + HALF, out2, mask=half_mask)
    if TO_CACHE:
        cached = (heads * 0 + slot) >= 0  # (a block: the interpreter takes no scalar in a mask)
        dst = cache_ptr + cache_row + heads * stride_c_head
        tl.store(dst + halves, _cache_value(out1, scale, cache_ptr, KV_FP8), mask=half_mask & cached)
        tl.store(dst + HALF + halves, _cache_value(out2, scale, cache_ptr, KV_FP8), mask=half_mask & cached)
        if 2 * HALF < BLOCK_D:
            tl.store(dst + cols, _cache_value(tail, scale, cache_ptr, KV_FP8), mask=tail_mask & cached)


@triton.jit
def _rope_and_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_norm_ptr, k_norm_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_cs_pos,
    stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, num_heads, head_dim, norm_eps,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr, QK_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
):
    # Token `program_id(0)`: q and k rotated in place for every token (slot -1 only skips the
    # cache write: prefill reads this step's keys from k, so k must end up rotated), k and v
    # written to the cache. Every value goes from registers to its stores, none is read back, so
    # the kernel is one round trip to memory (the ops in turn, or one kernel calling them, would
    # store and reload between the norm, the rotation and the write: three).
    # `head_dim` is the runtime copy of HEAD_DIM: the norm kernel divides by a runtime value.
    pdl_enter(PDL)
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    cos, sin = cos_sin_at(cos_sin_ptr, positions_ptr, tok, stride_cs_pos, HALF, BLOCK_HALF)
    cache_row = (slot // PAGE) * stride_c_block + (slot % PAGE) * stride_c_slot  # (not stored to at slot -1)
    _rope_heads(q_ptr + tok * stride_q_tok, stride_q_head, num_heads, cos, sin, q_norm_ptr, head_dim, norm_eps,
                k_cache_ptr, cache_row, slot, stride_c_head, k_scale,
                HALF, BLOCK_HALF, BLOCK_Q_HEADS, BLOCK_D, QK_NORM, TO_CACHE=False, KV_FP8=KV_FP8)
    _rope_heads(k_ptr + tok * stride_k_tok, stride_k_head, NUM_KV_HEADS, cos, sin, k_norm_ptr, head_dim, norm_eps,
                k_cache_ptr, cache_row, slot, stride_c_head, k_scale,
                HALF, BLOCK_HALF, BLOCK_H, BLOCK_D, QK_NORM, TO_CACHE=True, KV_FP8=KV_FP8)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM) & ((heads * 0 + slot) >= 0)
    v = tl.load(v_ptr + tok * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    tl.store(v_cache_ptr + cache_row + heads * stride_c_head + dims, _cache_value(v, v_scale, v_cache_ptr, KV_FP8),
             mask=mask)


def rope_and_write_kv_cache(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip the write (q/k still rotated)
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos first half, sin second half
    k_scale: float = 1.0,  # fp8 cache only: stored = k / k_scale
    v_scale: float = 1.0,
    pdl: bool = False,
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]: RMSNorm each q head first
    k_norm_weight: torch.Tensor | None = None,  # [head_dim]: and each k head (both or neither)
    qk_norm_eps: float = 1e-6,
) -> None:
    """`rope_neox_(q, k, positions, cos_sin_cache)` then `write_kv_cache(k, v, ...)` in one launch,
    with bit-identical results; dims past rotary_dim are left alone (partial rotary). With the norm
    weights, q and k are first replaced in place by `rms_norm(q, q_norm_weight, qk_norm_eps)` and
    `rms_norm(k, k_norm_weight, qk_norm_eps)` (`rms_norm.py`), bit for bit. `pdl`: launched
    dependent on the kernel before (`ops/pdl.py`)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rope_meta = rope_launch_meta(q, k, cos_sin_cache)
    assert v.shape[2] == head_dim and v.stride(-1) == 1
    qk_norm = q_norm_weight is not None
    assert qk_norm == (k_norm_weight is not None), "q and k norm weights come together"
    if qk_norm:
        assert q_norm_weight.shape == (head_dim,) and k_norm_weight.shape == (head_dim,)
        assert q_norm_weight.stride(0) == 1 and k_norm_weight.stride(0) == 1
    if num_tokens == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    # Every argument is fixed for a model's life (shapes, strides of the qkv views, scales), and the
    # step's token count is only the grid: nothing here recompiles from one step to the next.
    _rope_and_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q_norm_weight, k_norm_weight,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale), num_heads,
        head_dim, float(qk_norm_eps),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1], HALF=rope_meta["HALF"],
        BLOCK_HALF=rope_meta["BLOCK_HALF"], BLOCK_Q_HEADS=rope_meta["BLOCK_Q_HEADS"],
        BLOCK_H=rope_meta["BLOCK_K_HEADS"], BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8, QK_NORM=qk_norm, PDL=pdl, num_warps=rope_meta["num_warps"], **launch_options(pdl),
    )
