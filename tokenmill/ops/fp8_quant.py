"""Dynamic fp8 quantisation of activations, per token and group of features: the input pass of
the fp8 GEMM (`fp8_gemm.py`).

`per_token_group_quant(x, group)` returns `x_q [M, K]` (e4m3) and `scales [M, ceil(K / group)]`
(float32), `x ~= x_q * scale`, computed exactly as `fp8_format.per_token_group_quant_ref` (IEEE
division, so the rounding to e4m3 is the same bit for bit). Block-FP8 layers quantise with
`group` = the weight's input block (128): the GEMM then applies one activation scale per K tile;
per-channel layers with `group = K`, one scale per token.

One program quantises `ROWS` rows of one group: a pass for the group's absolute maximum, then one
that writes the scaled values (the second load is served from L1/L2). Each element is read twice
and written once as a byte: a cheap pass next to the GEMM it feeds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.fp8_format import _AMAX_EPS, FP8_DTYPE, FP8_MAX


# One compiled kernel for every token count (M follows the batch) and both scale layouts (Triton
# would otherwise compile a variant for a scale stride of 1, i.e. for each layout, and one of them
# could first be needed after start-up).
@triton.jit(do_not_specialize=["M", "stride_sm", "stride_sg"])
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sg,
                        GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                        UE8M0: tl.constexpr, EPS: tl.constexpr, FMAX: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    group = tl.program_id(1)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK)
    start = group * GROUP
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    amax = tl.zeros((ROWS,), dtype=tl.float32)
    for offset in range(0, GROUP, BLOCK):
        k = start + offset + cols
        mask = row_ok[:, None] & (k < K)[None, :] & (offset + cols < GROUP)[None, :]
        x = tl.load(x_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = tl.math.div_rn(tl.maximum(amax, EPS), tl.full((ROWS,), FMAX, tl.float32))
    if UE8M0:
        # The smallest power of two >= scale, on the bits (as `fp8_format.round_up_to_power_of_two`).
        scale = ((scale.to(tl.int32, bitcast=True) + 0x7FFFFF) & -0x800000).to(tl.float32, bitcast=True)
    tl.store(s_ptr + rows.to(tl.int64) * stride_sm + group * stride_sg, scale, mask=row_ok)
    q_rows = q_ptr + rows[:, None].to(tl.int64) * stride_qm
    for offset in range(0, GROUP, BLOCK):
        k = start + offset + cols
        mask = row_ok[:, None] & (k < K)[None, :] & (offset + cols < GROUP)[None, :]
        x = tl.load(x_rows + k[None, :], mask=mask, other=0.0).to(tl.float32)
        q = tl.clamp(tl.math.div_rn(x, scale[:, None]), -FMAX, FMAX)
        tl.store(q_rows + k[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


def per_token_group_quant(x: torch.Tensor, group: int, ue8m0: bool = False, m_major_scales: bool = False,
                          row_multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (bf16/fp16/fp32, unit stride in K) -> (x_q [M, K] e4m3, scales [M, ceil(K/group)] float32).
    `m_major_scales` lays the scales out with the token axis contiguous (strides (1, M)), the form
    cuBLAS's block-scaled GEMM takes; `row_multiple` rounds M up to a multiple of it (rows past
    x's are zeros with scale 1), for a GEMM that wants its scales' rows aligned."""
    assert x.dim() == 2 and x.stride(1) == 1
    m, k = x.shape
    rows_out = -(-m // row_multiple) * row_multiple
    groups = triton.cdiv(k, group)
    x_q = torch.empty(rows_out, k, dtype=FP8_DTYPE, device=x.device)
    if m_major_scales:
        scales = torch.empty(groups, rows_out, dtype=torch.float32, device=x.device).t()
    else:
        scales = torch.empty(rows_out, groups, dtype=torch.float32, device=x.device)
    if rows_out > m:
        x_q[m:].zero_()
        scales[m:].fill_(1.0)
    if m == 0:
        return x_q, scales
    block = min(triton.next_power_of_2(group), 1024)
    rows = max(1, min(16, 2048 // block))  # ~2k elements a program; not m's: one variant per group size
    _group_quant_kernel[(triton.cdiv(m, rows), groups)](
        x, x_q, scales, m, k, x.stride(0), x_q.stride(0), scales.stride(0), scales.stride(1),
        GROUP=group, ROWS=rows, BLOCK=block, UE8M0=ue8m0, EPS=_AMAX_EPS, FMAX=FP8_MAX,
        num_warps=4 if block * rows >= 1024 else 1)
    return x_q, scales
