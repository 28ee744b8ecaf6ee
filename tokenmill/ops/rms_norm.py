"""RMSNorm, with the residual add fused in: a Triton kernel beside the PyTorch function it must
match (`rms_norm_ref`, also the CPU path).

One pass reads the input (and residual) once and writes once; eager PyTorch makes 3-6 passes and as
many launches. Rounding follows HF transformers' `LlamaRMSNorm` so the two agree closely: the
residual sum and the normalised value are rounded to the model dtype before the weight multiply.

Every norm sums its squares in one fixed order (`sum_of_squares`), because it is also inlined
into other kernels that must give the same bits: Qwen3's per-head q/k norm into the rope + KV-write
kernel (`ops/kv_cache_write.py`), a decoder layer's norm into the batch-1
GEMV that consumes it (`norm_prologue`, in `ops/gemv.py` and `ops/moe_routing.py`). A `tl.sum`
adds in an order that follows the register layout each kernel's compiler picks for it.
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
    store_normalised(x, row_sum_of_squares(x), weight_ptr, out_ptr, out_offs, cols, mask, mask, hidden, eps)


@triton.jit
def row_sum_of_squares(x):
    """`sum_of_squares` of one float32 row [BLOCK] (BLOCK a power of two >= 2), a scalar."""
    BLOCK: tl.constexpr = x.shape[0]
    return tl.sum(sum_of_squares(tl.reshape(x, [1, BLOCK]), 1, BLOCK), 0)  # (a sum of one value)


@triton.jit
def norm_prologue(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, hidden, eps, program,
                  HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr, BLOCK: tl.constexpr):
    """For a kernel that consumes `rms_norm(x, weight, eps, residual)` of one row: the row's
    reciprocal RMS (float32, the bits `rms_norm` divides by), for `normed_chunk` to normalise
    the chunks it loads. Program 0 (`program` is the caller's id) also stores what `rms_norm`
    returns beside the consumer's input: x + residual (HAS_RESIDUAL) and, with WRITE_NORMED, the
    normalised row."""
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    first = mask & (tl.zeros_like(cols) == program)  # (a block mask: the interpreter wants one)
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x_rounded = x.to(residual_out_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + cols, x_rounded, mask=first)
        x = x_rounded.to(tl.float32)
    sum_sq = row_sum_of_squares(x)
    if WRITE_NORMED:
        store_normalised(x, sum_sq, norm_w_ptr, normed_out_ptr, cols, cols, first, first, hidden, eps)
    return tl.rsqrt(sum_sq / hidden + eps)


@triton.jit
def normed_chunk(x_ptr, residual_ptr, norm_w_ptr, offs, mask, rstd, HAS_RESIDUAL: tl.constexpr):
    """Elements `offs` of `rms_norm(x, weight, eps, residual)` in float32, bit for bit, given the
    row's `rstd` from `norm_prologue`."""
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(x_ptr.dtype.element_ty).to(tl.float32)
    normed = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(norm_w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (normed * w).to(x_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def store_normalised(x, sum_sq, weight_ptr, out_ptr, out_offs, w_offs, mask, w_mask, hidden, eps):
    """Store `x` (float32, rows along its last dim) normalised by its rows' sums of squares
    `sum_sq` (broadcast against x) times the weight: the normalised value is rounded to the output
    dtype before the weight multiply, as HF does."""
    rstd = tl.rsqrt(sum_sq / hidden + eps)
    normed = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + out_offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sum_of_squares(x, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The sum of squares of each row of `x` ([ROWS, BLOCK] float32, BLOCK a power of two >= 2)
    -> [ROWS], in one fixed order: each pair of neighbours in one fma (`x1 * x1 + x0 * x0`), then
    neighbouring partial sums up a balanced binary tree. Every step combines two given values, so
    the bits depend neither on the layout nor on the kernel it is inlined into. (`tl.sum(x * x)`
    would not do: its order follows the layout, and the compiler fuses a square into an add as an
    fma only where both sit in one thread.)"""
    even, odd = tl.split(tl.reshape(x, [ROWS, BLOCK // 2, 2]))
    partial = tl.fma(odd, odd, even * even)  # [ROWS, BLOCK / 2]
    for level in tl.static_range(2, 17):
        if (BLOCK >> level) > 0:
            partial = tl.sum(tl.reshape(partial, [ROWS, BLOCK >> level, 2]), 2)
    return tl.reshape(partial, [ROWS])


def rms_norm(
    x: torch.Tensor,  # [..., hidden]; 2-D or 3-D (per head) with any outer strides, last dim contiguous
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
        block = max(2, triton.next_power_of_2(hidden))  # (`sum_of_squares` pairs its elements)
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
