"""A Triton GEMV for one-token linear layers (batch-1 decode) on CUDA.

Batch-1 decode reads every weight once per token, so its speed is the bandwidth its matrix-vector
products reach. cuBLAS runs them as small-N GEMM tiles (2.75 TB/s on the H100 for the Llama-3.1-8B
weight set, docs/perf.md). This kernel streams each weight row block once with wide loads, keeps
the partial products in registers across the K loop and reduces them once at the end.

`gemv(x, weight)` computes `x @ weight.T` for x of one row; `linear()` in `linear.py` calls it only
where it measured faster (see docs/perf.md, "Batch-1 GEMV").
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk in ((4, 512), (8, 256), (8, 512), (16, 256), (16, 512), (32, 128), (8, 1024))
    for w in (4, 8)
    for s in (1, 3)
]


@triton.autotune(configs=_CONFIGS, key=["N", "K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    for k in range(0, K, BLOCK_K):
        k_mask = (k + cols) < K
        # Weights are read once per token: don't let them evict what is reused (activations).
        w = tl.load(w_ptrs + k, mask=row_mask[:, None] & k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")
        x = tl.load(x_ptr + k + cols, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x @ weight.T` for x [1, K] (or [K]) and weight [N, K], both contiguous in K."""
    assert x.shape[-1] == weight.shape[1] and x.numel() == weight.shape[1]
    assert weight.stride(1) == 1
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _gemv_kernel[grid](x, weight, y, n, k, weight.stride(0))
    return y
