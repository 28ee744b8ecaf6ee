"""A Triton GEMV for one-token linear layers (batch-1 decode) on CUDA.

Batch-1 decode reads every weight once per token, so its speed is the bandwidth its matrix-vector
products reach. cuBLAS runs them as small-N GEMM tiles (2.75 TB/s on the H100 for the Llama-3.1-8B
weight set, docs/perf.md). This kernel streams each weight row block once with wide loads, keeps
the partial products in registers across the K loop and reduces them once at the end.

`gemv(x, weight)` computes `x @ weight.T` for x of one row; the CUDA linear method
(`model/layers/linear_method.py`) calls it only where it measured faster (see docs/perf.md, "Batch-1 GEMV").

Launch configurations: where `gemv_configs.py` lists the device and the (N, K) shape, its measured
configuration; elsewhere Triton's autotuner. The autotuner times each candidate alone with
`do_bench`, which at 5-30 us is mostly launch overhead and L2 flushing; in the engine a GEMV runs in
a CUDA graph right after another kernel, and there its picks were 2-10% slower than the best.

`gemv(gate_up, weight, silu_mul=True)` is the MLP's down projection fed the gate/up projection's
raw output: it computes `silu(gate) * up` as it loads x (`GatedMLP`, `model/layers/mlp.py`), so
batch-1 decode runs no separate activation kernel. The activation is rounded exactly as
`ops/activation.silu_and_mul` rounds it, so the result is bit-identical to
`gemv(silu_and_mul(gate_up), weight)`. Every program recomputes the activation of the x it reads
(K sigmoids per program), which is small next to its share of the weight stream.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from tokenmill.ops.all_reduce_rms_norm import push_row_words
from tokenmill.ops.gemv_configs import tuned_config
from tokenmill.ops.pdl import launch_options, pdl_enter

if TYPE_CHECKING:
    from tokenmill.distributed.symm_mem import PushTarget

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk in ((4, 512), (8, 256), (8, 512), (16, 256), (16, 512), (32, 128), (8, 1024))
    for w in (4, 8)
    for s in (1, 3)
]


@triton.jit
def _load_x(x_ptr, offs, mask, K, SILU_MUL: tl.constexpr):
    """x[offs] in float32; with SILU_MUL, x = [gate | up] (each K long) and this is
    silu(gate) * up rounded like `activation._silu_and_mul_kernel` (the activation, then the
    product, each rounded to x's dtype), which keeps the fused path bit-identical to the unfused."""
    if SILU_MUL:
        gate = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + offs, mask=mask, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty).to(tl.float32)
        return (act * up).to(x_ptr.dtype.element_ty).to(tl.float32)
    else:
        return tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def load_weight_tile(w_ptrs, k, row_mask, cols, K):
    """Columns k .. k + BLOCK_K of the program's rows. Weights are read once per token: they must
    not evict what is reused (activations)."""
    return tl.load(w_ptrs + k, mask=row_mask[:, None] & ((k + cols) < K)[None, :], other=0.0,
                   eviction_policy="evict_first")


@triton.jit
def row_block_sums(x_ptr, w_ptr, rows, row_mask, K, stride_wn, SILU_MUL: tl.constexpr, BLOCK_K: tl.constexpr,
                   PDL: tl.constexpr):
    """float32 products of x with the weight rows `rows` ([BLOCK_N]): the K loop of a GEMV
    program. With PDL the first weight tile is read before waiting for the kernel before: weights
    change only between steps (loading, updates), never in the kernel before this one."""
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    k_begin = 0
    if PDL:
        w = load_weight_tile(w_ptrs, 0, row_mask, cols, K)
        pdl_enter(PDL)
        acc += w.to(tl.float32) * _load_x(x_ptr, cols, cols < K, K, SILU_MUL)[None, :]
        k_begin = BLOCK_K
    for k in range(k_begin, K, BLOCK_K):
        w = load_weight_tile(w_ptrs, k, row_mask, cols, K)
        x = _load_x(x_ptr, k + cols, (k + cols) < K, K, SILU_MUL)
        acc += w.to(tl.float32) * x[None, :]
    return tl.sum(acc, axis=1)


# `slot` alternates 0/1 from call to call: unspecialised, so one compiled kernel serves both.
@triton.autotune(configs=_CONFIGS, key=["N", "K", "SILU_MUL"])
@triton.jit(do_not_specialize=["slot"])
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn,
                 buffer_ptrs, calls_ptr, slot, region_words,  # PUSH only (push_to_peers)
                 SILU_MUL: tl.constexpr, PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                 MAX_ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = row_block_sums(x_ptr, w_ptr, rows, row_mask, K, stride_wn, SILU_MUL, BLOCK_K, PDL).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows, y, mask=row_mask)
    if PUSH:
        # This rank's partial sums, sent now to the peers' buffers for the fused all-reduce + norm
        # that follows (`ops/all_reduce_rms_norm.py`), in its format: int32 words of two
        # 16-bit elements (even one low), stamped with the call number that kernel will use (its
        # counter + 1; it bumps the counter). Row 0: pushing GEMVs are batch-1 decode's.
        call = tl.load(calls_ptr + slot * MAX_ROWS) + 1
        even, odd = tl.split(tl.reshape(y, [BLOCK_N // 2, 2]))
        words = ((even.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF)
                 | (odd.to(tl.int16, bitcast=True).to(tl.int32) << 16))
        word_offs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        push_row_words(words, word_offs, word_offs < N // 2, call.to(tl.int64) << 32, buffer_ptrs, slot,
                       region_words, 0, RANK, WORLD)


def gemv(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool = False, push: "PushTarget | None" = None,
         pdl: bool = False) -> torch.Tensor:
    """`x @ weight.T` for x [1, K] (or [K]) and weight [N, K], both contiguous in K.

    With `silu_mul`, x is [1, 2K] (gate, then up) and the product is `silu_and_mul(x) @ weight.T`,
    bit for bit. With `push` (a 2-byte dtype, even N), each program also sends its slice of the
    result to the tensor-parallel peers for the fused all-reduce + norm to come, which then need
    not send it (`RMSNorm`, `model/layers/layernorm.py`): the NVLink trip overlaps the GEMV's tail.
    With `pdl` (a GPU `ops/pdl.supported`), it is launched dependent on the kernel before and
    reads its first weight tile while that one finishes."""
    n, k = weight.shape
    assert x.numel() == x.shape[-1] == (2 * k if silu_mul else k)
    assert weight.stride(1) == 1
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if push is not None:
        assert x.element_size() == 2 and n % 2 == 0, "pushed rows are words of two 16-bit elements"
        comm = (push.buffer_ptrs, push.call_counters, push.slot, push.region_words)
        meta = dict(PUSH=True, RANK=push.rank, WORLD=push.world_size, MAX_ROWS=push.call_counters.shape[1])
    else:
        comm = (y, y, 0, 0)  # not read
        meta = dict(PUSH=False, RANK=0, WORLD=1, MAX_ROWS=1)
    meta.update(PDL=pdl, **launch_options(pdl))
    config = tuned_config(weight, silu_mul)
    if config is not None:
        _gemv_kernel.fn[(triton.cdiv(n, config.block_n),)](
            x, weight, y, n, k, weight.stride(0), *comm, SILU_MUL=silu_mul, **meta, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemv_kernel[grid](x, weight, y, n, k, weight.stride(0), *comm, SILU_MUL=silu_mul, **meta)
    return y
