"""The w8a8 fp8 GEMM: `y = x @ w.T` with both operands in e4m3 and float32 scales (Hopper/Ada).

`fp8_linear(x, w_q, w_scale, block)` quantises the activations (`fp8_quant.per_token_group_quant`,
one cheap pass) and multiplies on the fp8 tensor cores, accumulating in float32:

- block scales (block-FP8 checkpoints, `block = (bn, bk)`): `w_scale [ceil(N/bn), ceil(K/bk)]`,
  activations per token and group of `bk`. The K tile is one block, so each step of the K loop
  multiplies its tile product by one activation scale per row and one weight scale per column:
  `acc += (a_q @ w_q.T) * a_s[m, kb] * w_s[n // bn, kb]` (DeepSeek's scheme).
- channel scales (online fp8, `block = None`): `w_scale [N]`, activations per token; the scales
  factor out of the whole sum and multiply the accumulator once at the end.

A bias, if given, is added in the epilogue. Its reference is `fp8_gemm_ref` (dequantise both
operands, one float32 matmul), which the tests hold the kernel to.

Launch configuration: `gemm_config(M, N, K, block)`, a heuristic by M (small M is bound by reading
the weights; large M by the tensor cores); the benchmark (`tokenmill/benchmarks/kernels/fp8.py`)
sweeps the alternatives on the device.

cuBLAS's fp8 GEMM (`torch._scaled_mm`) takes both scale forms on Hopper with torch 2.11 (CUDA
12.9+): row-wise (per token x per channel) and DeepSeek's blocks (1 x 128 activation scales laid out
token-major, 128 x 128 weight blocks): `cublas_fp8_gemm`. `fp8_linear(..., cublas_min_rows=R)`
sends products of R or more rows there, where the tensor cores bound the time and cuBLAS's kernels
are faster than this one (fewer rows are bound by reading the weights);
`cublas_scaled_mm_supported(device, block)` tells, once, whether this torch and GPU take the call.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tokenmill.ops.fp8_format import (
    dequantize_weight_blocks,
    dequantize_weight_per_channel,
    quantize_weight_blocks,
    quantize_weight_per_channel,
)
from tokenmill.ops.fp8_quant import per_token_group_quant


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    group_m: int
    num_warps: int
    num_stages: int


# One compiled kernel for every token count (M follows the batch; only its tile bucket is a constant).
@triton.jit(do_not_specialize=["M"])
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                     BLOCKWISE: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr):
    """C[M, N] = A[M, K] @ B[N, K].T, A and B e4m3 (unit stride in K). BLOCKWISE: A scales
    [M, cdiv(K, BLOCK_K)], B scales [cdiv(N, SCALE_BLOCK_N), cdiv(K, BLOCK_K)]; else A scales [M],
    B scales [N]."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Row tiles in groups of GROUP_M, column tiles inner: a group's programs share weight tiles in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    a_scale_ptrs = a_scale_ptr + offs_m.to(tl.int64) * stride_asm
    b_scale_ptrs = b_scale_ptr + (offs_n // SCALE_BLOCK_N).to(tl.int64) * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if BLOCKWISE:
            a_s = tl.load(a_scale_ptrs + kb, mask=m_ok, other=0.0)
            b_s = tl.load(b_scale_ptrs + kb, mask=n_ok, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if not BLOCKWISE:
        a_s = tl.load(a_scale_ptrs, mask=m_ok, other=0.0)
        b_s = tl.load(b_scale_ptrs, mask=n_ok, other=0.0)
        acc = acc * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm_config(m: int, n: int, k: int) -> GemmConfig:
    """A launch configuration by the number of rows: narrow row tiles where the weights' bytes
    bound the time, wide ones with L2-grouped rows where the tensor cores do."""
    if m <= 16:
        return GemmConfig(block_m=16, block_n=64, group_m=1, num_warps=4, num_stages=4)
    if m <= 64:
        return GemmConfig(block_m=32, block_n=64, group_m=8, num_warps=4, num_stages=4)
    if m <= 256:
        return GemmConfig(block_m=64, block_n=128, group_m=8, num_warps=4, num_stages=3)
    return GemmConfig(block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=3)


def fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             block: tuple[int, int] | None, out_dtype: torch.dtype, bias: torch.Tensor | None = None,
             config: GemmConfig | None = None) -> torch.Tensor:
    """a_q [M, K] e4m3 with a_scale ([M, cdiv(K, bk)] for `block = (bn, bk)`, [M] or [M, 1]
    otherwise) times w_q [N, K] e4m3 with w_scale ([cdiv(N, bn), cdiv(K, bk)] or [N]) -> [M, N]
    in `out_dtype`, plus `bias` [N] if given."""
    m, k = a_q.shape
    n = w_q.shape[0]
    assert w_q.shape[1] == k and a_q.stride(1) == 1 and w_q.stride(1) == 1
    out = torch.empty(m, n, dtype=out_dtype, device=a_q.device)
    if m == 0:
        return out
    config = config or gemm_config(m, n, k)
    if block is not None:
        scale_block_n, block_k = block
        assert a_scale.shape == (m, triton.cdiv(k, block_k)), (a_scale.shape, m, k, block)
        assert w_scale.shape == (triton.cdiv(n, scale_block_n), triton.cdiv(k, block_k))
        stride_asm, stride_bsn = a_scale.stride(0), w_scale.stride(0)
    else:
        scale_block_n, block_k = 1, 128
        assert a_scale.numel() == m and w_scale.numel() == n
        a_scale, w_scale = a_scale.reshape(m), w_scale.reshape(n)
        stride_asm, stride_bsn = a_scale.stride(0), w_scale.stride(0)
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    _fp8_gemm_kernel[grid](
        a_q, w_q, out, a_scale, w_scale, bias if bias is not None else out, m, n, k,
        a_q.stride(0), w_q.stride(0), out.stride(0), stride_asm, stride_bsn,
        BLOCKWISE=block is not None, SCALE_BLOCK_N=scale_block_n, HAS_BIAS=bias is not None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)
    return out


CUBLAS_BLOCK = (128, 128)  # the only block shape cuBLAS's block-scaled GEMM takes
# From `benchmarks/kernels/fp8.py gemm --graphs` on an H100: from 64 rows cuBLAS is as fast or
# faster on Llama-3.1-8B's four matrices in both scale forms; at 16 or fewer it is slower on some.
CUBLAS_MIN_ROWS = 64


def cublas_fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    block: tuple[int, int] | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`fp8_gemm` through cuBLAS (`torch._scaled_mm`). Block (128, 128): a_scale [M, K/128]
    token-major (strides (1, M): `per_token_group_quant(..., m_major_scales=True)`), w_scale
    [N/128, K/128] as stored. Channel scales (block None): a_scale [M, 1], w_scale [N]."""
    if block is None:
        a_scale, w_scale = a_scale.reshape(-1, 1), w_scale.reshape(1, -1)
    else:
        w_scale = w_scale.t()
    return torch._scaled_mm(a_q, w_q.t(), a_scale, w_scale, out_dtype=out_dtype)


def cublas_can_take(n: int, k: int, block: tuple[int, int] | None) -> bool:
    """fp8 GEMM's 16-element alignment; for block scales, whole 128-blocks on both sides and a
    multiple of 4 blocks along K (the weight scales' rows in 16-byte steps: on an H100, K = 256
    gave wrong products, not an error). The activation scales' rows are aligned by padding the
    token count to a multiple of 4 (`CUBLAS_ROW_MULTIPLE`; unpadded, cuBLAS refuses other counts)."""
    if block is None:
        return n % 16 == 0 and k % 16 == 0
    return block == CUBLAS_BLOCK and n % 128 == 0 and k % 512 == 0


CUBLAS_ROW_MULTIPLE = 4


@functools.cache
def cublas_scaled_mm_supported(device: torch.device, block: tuple[int, int] | None) -> bool:
    """Whether `torch._scaled_mm` takes this scale form on the device: one small product against
    the reference (False where this torch, its cuBLAS or the GPU refuses it)."""
    if device.type != "cuda" or not cublas_can_take(256, 512, block):
        return False
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(256, 512, device=device, generator=gen, dtype=torch.bfloat16)
    w = torch.randn(256, 512, device=device, generator=gen, dtype=torch.bfloat16)
    if block is None:
        w_q, w_scale = quantize_weight_per_channel(w)
        x_q, x_scale = per_token_group_quant(x, 512)
    else:
        w_q, w_scale = quantize_weight_blocks(w, block)
        x_q, x_scale = per_token_group_quant(x, block[1], m_major_scales=True)
    try:
        y = cublas_fp8_gemm(x_q, x_scale, w_q, w_scale, block, torch.float32)
    except (RuntimeError, TypeError, ValueError, NotImplementedError):
        return False
    ref = fp8_gemm_ref(x_q, x_scale, w_q, w_scale, block, torch.float32)
    return bool(((y - ref).abs().max() <= 1e-2 * ref.abs().max()).item())


def fp8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int] | None,
               bias: torch.Tensor | None = None, ue8m0: bool = False,
               cublas_min_rows: int | None = None) -> torch.Tensor:
    """`x @ dequant(w).T + bias` for x [..., K] in its dtype: x quantised per token and group of
    `bk` (per token for channel scales), then `fp8_gemm`, or cuBLAS for `cublas_min_rows` or more
    rows where it takes the weight (`cublas_can_take`)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, k = w_q.shape
    group = block[1] if block is not None else shape[-1]
    m = x2.shape[0]
    if cublas_min_rows is not None and m >= cublas_min_rows and cublas_can_take(n, k, block):
        if block is None:
            x_q, x_scale = per_token_group_quant(x2, group, ue8m0)
        else:
            x_q, x_scale = per_token_group_quant(x2, group, ue8m0, m_major_scales=True,
                                                 row_multiple=CUBLAS_ROW_MULTIPLE)
        y = cublas_fp8_gemm(x_q, x_scale, w_q, w_scale, block, x.dtype)[:m]
        y = y if bias is None else y + bias
    else:
        x_q, x_scale = per_token_group_quant(x2, group, ue8m0)
        y = fp8_gemm(x_q, x_scale, w_q, w_scale, block, x.dtype, bias)
    return y.view(*shape[:-1], n)


def fp8_gemm_ref(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 block: tuple[int, int] | None, out_dtype: torch.dtype,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
    """`fp8_gemm` in plain torch: both operands dequantised to float32, one matmul."""
    m, k = a_q.shape
    if block is not None:
        a = dequantize_weight_blocks(a_q, a_scale, (1, block[1]), torch.float32)
        w = dequantize_weight_blocks(w_q, w_scale, block, torch.float32)
    else:
        a = a_q.float() * a_scale.reshape(m, 1)
        w = dequantize_weight_per_channel(w_q, w_scale.reshape(-1), torch.float32)
    y = a @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
