"""Rotary position embedding, neox style (rotate the two halves of the rotary dims), in place: a
Triton kernel beside its PyTorch reference. Dims past `rotary_dim` pass through (partial rotary)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rope_neox_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos in the first half, sin in the second
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated copies (float32 arithmetic, rounded once); dims past rotary_dim pass through."""
    rotary_dim = cos_sin_cache.shape[1]
    half = rotary_dim // 2
    cos_sin = cos_sin_cache[positions.long()].float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1 = x[..., :half].float()
        x2 = x[..., half:rotary_dim].float()
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
        return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)

    return rotate(q), rotate(k)


@triton.jit
def cos_sin_at(cos_sin_ptr, positions_ptr, tok, stride_cs_pos, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """(cos, sin) of token `tok`'s position, float32 [1, BLOCK_HALF] each (0 past HALF)."""
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cs_row = cos_sin_ptr + pos * stride_cs_pos
    cos = tl.load(cs_row + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    return cos, sin


@triton.jit
def rotate_halves(x1, x2, cos, sin, dtype: tl.constexpr):
    """The rotated halves of float32 x = [x1 | x2], rounded to `dtype` (the kernels that inline
    the rotation share these operations, hence its bits)."""
    return (x1 * cos - x2 * sin).to(dtype), (x2 * cos + x1 * sin).to(dtype)


@triton.jit
def _rotate_heads(x_ptr, stride_tok, stride_head, tok, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    ptr1 = x_ptr + tok * stride_tok + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    out1, out2 = rotate_halves(x1, x2, cos, sin, x_ptr.dtype.element_ty)
    tl.store(ptr1, out1, mask=mask)
    tl.store(ptr1 + HALF, out2, mask=mask)


@triton.jit
def _rope_neox_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs_pos,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = cos_sin_at(cos_sin_ptr, positions_ptr, tok, stride_cs_pos, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, stride_q_tok, stride_q_head, tok, num_heads, cos, sin,
                  HALF, BLOCK_Q_HEADS, BLOCK_HALF)
    _rotate_heads(k_ptr, stride_k_tok, stride_k_head, tok, num_kv_heads, cos, sin,
                  HALF, BLOCK_K_HEADS, BLOCK_HALF)


def rope_neox_(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], any token/head strides
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos first half, sin second half
) -> None:
    """Rotates q and k in place (both in one launch); dims past rotary_dim are left alone."""
    meta = rope_launch_meta(q, k, cos_sin_cache)
    if q.shape[0] == 0:
        return
    _rope_neox_kernel[(q.shape[0],)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        q.shape[1], k.shape[1], **meta,
    )


def rope_launch_meta(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> dict:
    """The checks and launch constants of `_rope_neox_kernel`, for `rope_neox_` and for the
    kernels that inline it (`kv_cache_write.rope_and_write_kv_cache`)."""
    num_heads, head_dim = q.shape[1:]
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and k.shape[2] == head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = rotary_dim // 2
    block_q_heads = triton.next_power_of_2(num_heads)
    return dict(HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_Q_HEADS=block_q_heads,
                BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
                num_warps=4 if block_q_heads * half <= 2048 else 8)
