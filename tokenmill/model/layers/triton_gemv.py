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


@triton.jit
def prefetch_to_l2(ptrs):
    """Ask the memory system to bring the 128-byte lines at `ptrs` into L2, without waiting."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)


@triton.autotune(configs=_CONFIGS, key=["N", "K", "PDL", "PREFETCH_K"])
@triton.jit
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn,
                 PDL: tl.constexpr, PREFETCH_K: tl.constexpr, LINE: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    if PDL:
        # Launched while the kernel before it still runs: the weights do not depend on it, so
        # start pulling the first PREFETCH_K columns of this block's rows into L2, let the next
        # kernel launch, and only then wait for the previous kernel's output (x).
        if PREFETCH_K > 0:
            lines = tl.arange(0, PREFETCH_K // LINE) * LINE
            safe_rows = tl.minimum(rows, N - 1).to(tl.int64)
            prefetch_to_l2(w_ptr + safe_rows[:, None] * stride_wn + lines[None, :])
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
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


def prefetch_columns(n: int, k: int, element_size: int, budget_bytes: int) -> int:
    """How many leading columns of an [n, k] weight to prefetch: a power-of-two number of
    128-byte lines per row, at most k columns and about `budget_bytes` in all (0: none)."""
    line = 128 // element_size
    cols = line
    if n * line * element_size > budget_bytes or line > k:
        return 0
    while cols * 2 <= k and n * cols * 2 * element_size <= budget_bytes:
        cols *= 2
    return cols


def gemv(x: torch.Tensor, weight: torch.Tensor, pdl: bool = False, prefetch_bytes: int = 0) -> torch.Tensor:
    """`x @ weight.T` for x [1, K] (or [K]) and weight [N, K], both contiguous in K.

    `pdl`: launch as a programmatic dependent launch (Hopper and later): the kernel may start
    while the one before it runs, prefetching up to `prefetch_bytes` of its weights into L2
    before it waits for that kernel's output.
    """
    assert x.shape[-1] == weight.shape[1] and x.numel() == weight.shape[1]
    assert weight.stride(1) == 1
    n, k = weight.shape
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    prefetch_k = prefetch_columns(n, k, weight.element_size(), prefetch_bytes) if pdl else 0
    _gemv_kernel[grid](x, weight, y, n, k, weight.stride(0), PDL=pdl, PREFETCH_K=prefetch_k,
                       LINE=128 // weight.element_size(), launch_pdl=pdl)
    return y
