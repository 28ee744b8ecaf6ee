"""RMSNorm, with the residual add fused in: a Triton kernel beside the PyTorch function it must
match (`rms_norm_ref`, also the CPU path).

One pass reads the input (and residual) once and writes once; eager PyTorch makes 3-6 passes and as
many launches. Rounding follows HF transformers' `LlamaRMSNorm` so the two agree closely: the
residual sum and the normalised value are rounded to the model dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.pdl import launch_options, pdl_enter

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
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
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
    the tail of `ops/all_reduce_rms_norm.py`'s kernel, which must match this one)."""
    rstd = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [..., hidden]; 2-D or 3-D with any outer strides, last dim contiguous
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_rows, hidden], contiguous rows
    pdl: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim. Returns `out` (contiguous, x's shape), or with `residual`
    `(out, x + residual)`: the add and the norm in one pass. `pdl`: launched dependent on the
    kernel before (`ops/pdl.py`)."""
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
            HAS_RESIDUAL=residual is not None, BLOCK=block, PDL=pdl,
            num_warps=max(1, min(8, block // 512)), **launch_options(pdl),
        )
    if residual is None:
        return out
    return out, residual_out.view(x.shape)
