"""Fused Triton kernels for the element-wise layers of a decoder step, each beside the plain
PyTorch function it must match (`*_ref`), which is also the CPU path.

Each fused op reads its input once and writes its output once; the eager PyTorch versions make
3-6 passes and as many kernel launches. Rounding follows HF transformers so that the two agree
closely: RMSNorm rounds the residual sum and the normalised value to the model dtype before the
weight multiply (as `LlamaRMSNorm` does); SiLU-and-mul rounds SiLU's output before the multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# RMSNorm (+ residual add)
# ---------------------------------------------------------------------------------------------


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF `LlamaRMSNorm` over the last dim; with `residual`, normalises `x + residual` and also
    returns that sum (the next layer's residual)."""
    if residual is not None:
        x = x + residual
        new_residual = x
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    out = weight * normed
    return (out, new_residual) if residual is not None else out


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x_outer, stride_x_inner, inner_size, stride_r_row,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    # Row r of the flattened input is x[r // inner_size, r % inner_size, :] so that per-head
    # norms (Qwen3's q/k norm on a strided view of the fused qkv output) need no copy.
    row = tl.program_id(0).to(tl.int64)
    x_row = (row // inner_size) * stride_x_outer + (row % inner_size) * stride_x_inner
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r_row + cols, mask=mask, other=0.0).to(tl.float32)
        x_rounded = x.to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden + cols, x_rounded, mask=mask)
        x = x_rounded.to(tl.float32)
    rms_norm_store(x, weight_ptr, out_ptr, row * hidden + cols, cols, mask, hidden, eps)


@triton.jit
def rms_norm_store(x, weight_ptr, out_ptr, out_offs, cols, mask, hidden, eps):
    """Normalise one float32 row `x` and store it times the weight, rounding as HF does (also
    the tail of `distributed/all_reduce_rms_norm.py`'s kernel, which must match this one)."""
    rstd = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., hidden]; 2-D or 3-D with any outer strides, last dim contiguous
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_rows, hidden], contiguous rows
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim. Returns `out` (contiguous, x's shape), or with `residual`
    `(out, x + residual)`: the add and the norm in one pass."""
    hidden = x.shape[-1]
    assert x.stride(-1) == 1 and weight.shape == (hidden,)
    if x.dim() == 2:
        outer, inner = x.shape[0], 1
        stride_outer, stride_inner = x.stride(0), 0
    elif x.dim() == 3:
        outer, inner = x.shape[0], x.shape[1]
        stride_outer, stride_inner = x.stride(0), x.stride(1)
    else:
        x = x.reshape(-1, hidden)
        outer, inner, stride_outer, stride_inner = x.shape[0], 1, x.stride(0), 0
    num_rows = outer * inner
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if residual is not None:
        residual = residual.reshape(num_rows, hidden)
        assert residual.stride(-1) == 1
        residual_out = torch.empty((num_rows, hidden), dtype=x.dtype, device=x.device)
    else:
        residual_out = out
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, residual_out,
            stride_outer, stride_inner, inner, residual.stride(0) if residual is not None else 0,
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=max(1, min(8, block // 512)),
        )
    if residual is None:
        return out
    return out, residual_out.view(x.shape)


# ---------------------------------------------------------------------------------------------
# SiLU-and-mul (the gated MLP's activation)
# ---------------------------------------------------------------------------------------------


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * I] (gate, then up) -> silu(gate) * up, [num_tokens, I]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x_row, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x_row + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * inter + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[num_tokens, 2 * I] (gate, then up; last dim contiguous) -> [num_tokens, I]."""
    assert x.dim() == 2 and x.shape[1] % 2 == 0 and x.stride(1) == 1
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens:
        block = min(2048, triton.next_power_of_2(inter))
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(inter, block))](
            x, out, x.stride(0), inter, BLOCK=block, num_warps=4,
        )
    return out


# ---------------------------------------------------------------------------------------------
# Rotary embedding, neox style (rotate the two halves of the rotary dims), in place
# ---------------------------------------------------------------------------------------------


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
def _rotate_heads(x_ptr, stride_tok, stride_head, tok, num_heads, cos, sin,
                  HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF)
    ptr1 = x_ptr + tok * stride_tok + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_neox_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs_pos,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    cs_row = cos_sin_ptr + pos * stride_cs_pos
    cos = tl.load(cs_row + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cs_row + HALF + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
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
    kernels that inline it (`triton_kernels.rope_and_write_kv_cache`)."""
    num_heads, head_dim = q.shape[1:]
    rotary_dim = cos_sin_cache.shape[1]
    assert rotary_dim % 2 == 0 and rotary_dim <= head_dim and k.shape[2] == head_dim
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    half = rotary_dim // 2
    block_q_heads = triton.next_power_of_2(num_heads)
    return dict(HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_Q_HEADS=block_q_heads,
                BLOCK_K_HEADS=triton.next_power_of_2(k.shape[1]),
                num_warps=4 if block_q_heads * half <= 2048 else 8)
