"""A Triton GEMV for one-token linear layers (batch-1 decode) on CUDA.

Batch-1 decode reads every weight once per token, so its speed is the bandwidth its matrix-vector
products reach. cuBLAS runs them as small-N GEMM tiles (2.75 TB/s on the H100 for the Llama-3.1-8B
weight set, docs/perf.md). This kernel streams each weight row block once with wide loads, keeps
the partial products in registers across the K loop and reduces them once at the end.

`gemv(x, weight)` computes `x @ weight.T` for x of one row; the CUDA linear method
(`model/layers/linear_method.py`) calls it only where it measured faster (see docs/perf.md, "Batch-1 GEMV").

Launch configurations: where `gemv_configs.py` lists the device and the (N, K) shape, its measured
configuration (dependent launches, with or without the fused norm, have a table of their own);
elsewhere Triton's autotuner. The autotuner times each candidate alone with
`do_bench`, which at 5-30 us is mostly launch overhead and L2 flushing; in the engine a GEMV runs in
a CUDA graph right after another kernel, and there its picks were 2-10% slower than the best.

`gemv(gate_up, weight, silu_mul=True)` is the MLP's down projection fed the gate/up projection's
raw output: it computes `silu(gate) * up` as it loads x (`GatedMLP`, `model/layers/mlp.py`), so
batch-1 decode runs no separate activation kernel. The activation is rounded exactly as
`ops/activation.silu_and_mul` rounds it, so the result is bit-identical to
`gemv(silu_and_mul(gate_up), weight)`. Every program recomputes the activation of the x it reads
(K sigmoids per program), which is small next to its share of the weight stream.

`rms_norm_gemv(x, norm_weight, eps, weight, residual)` is a pre-norm layer's norm and the GEMV
after it (a decoder layer's input norm and its QKV projection, its post-attention norm and the
MLP's gate/up projection): every program sums the squares of the row (x + residual, 4-8 KB from
L2) before its K loop and normalises each chunk of x as it loads it, the first program also stores
x + residual, the next residual. Bit-identical to `gemv(rms_norm(x, norm_weight, eps, residual),
weight)` (the norm's sum of squares goes in `rms_norm.sum_of_squares`'s fixed order in both), so
batch-1 decode runs no separate norm kernel (`RMSNorm.forward_then`, `model/layers/layernorm.py`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch
import triton
import triton.language as tl

from tokenmill.ops.all_reduce_rms_norm import push_row_words
from tokenmill.ops.gemv_configs import tuned_config
from tokenmill.ops.pdl import launch_options, pdl_enter
from tokenmill.ops.rms_norm import norm_prologue, normed_chunk

if TYPE_CHECKING:
    from tokenmill.distributed.symm_mem import PushTarget

_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bn, bk in ((4, 512), (8, 256), (8, 512), (16, 256), (16, 512), (32, 128), (8, 1024))
    for w in (4, 8)
    for s in (1, 3)
]


class NormArgs(NamedTuple):
    """What a GEMV kernel needs to consume `rms_norm(x, weight, eps, residual)` of its input row
    (`rms_norm.norm_prologue`): `residual_out` receives x + residual, `normed_out` (with
    `write_normed`) the normalised row, both from the first program. A kernel without the norm
    gets `NormArgs.off(x)`: placeholders it never reads."""

    weight: torch.Tensor
    residual: torch.Tensor
    residual_out: torch.Tensor
    normed_out: torch.Tensor
    eps: float
    has_residual: bool
    write_normed: bool
    on: bool = True

    @staticmethod
    def off(x: torch.Tensor) -> "NormArgs":
        return NormArgs(x, x, x, x, 0.0, False, False, on=False)

    def kernel_args(self) -> tuple:
        return self.residual, self.weight, self.residual_out, self.normed_out, self.eps

    def meta(self, hidden: int) -> dict:
        return dict(NORM=self.on, HAS_RESIDUAL=self.has_residual, WRITE_NORMED=self.write_normed,
                    BLOCK_H=max(2, triton.next_power_of_2(hidden)) if self.on else 2)


@triton.jit
def _load_input(x_ptr, offs, mask, K, SILU_MUL: tl.constexpr, residual_ptr, norm_w_ptr, rstd,
                NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """`_load_x`, or with NORM the row's RMSNorm at offs (`rstd` from `norm_prologue`), bit for bit."""
    if NORM:
        return normed_chunk(x_ptr, residual_ptr, norm_w_ptr, offs, mask, rstd, HAS_RESIDUAL)
    else:
        return _load_x(x_ptr, offs, mask, K, SILU_MUL)


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
def row_block_sums(x_ptr, w_ptr, rows, row_mask, K, stride_wn, program,
                   residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, eps,
                   SILU_MUL: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
                   NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr,
                   BLOCK_H: tl.constexpr):
    """float32 products of x with the weight rows `rows` ([BLOCK_N]): the K loop of a GEMV
    program. With PDL the first weight tile is read before waiting for the kernel before: weights
    change only between steps (loading, updates), never in the kernel before this one. With NORM
    (`NormArgs`) the product is that of the row's RMSNorm; program 0 (`program`: the caller's id)
    stores the norm's outputs."""
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((rows.shape[0], BLOCK_K), dtype=tl.float32)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    k_begin = 0
    rstd = 0.0
    if PDL:
        w = load_weight_tile(w_ptrs, 0, row_mask, cols, K)
        pdl_enter(PDL)
        if NORM:
            rstd = norm_prologue(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, K, eps, program,
                                 HAS_RESIDUAL, WRITE_NORMED, BLOCK_H)
        x = _load_input(x_ptr, cols, cols < K, K, SILU_MUL, residual_ptr, norm_w_ptr, rstd, NORM, HAS_RESIDUAL)
        acc += w.to(tl.float32) * x[None, :]
        k_begin = BLOCK_K
    elif NORM:
        rstd = norm_prologue(x_ptr, residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, K, eps, program,
                             HAS_RESIDUAL, WRITE_NORMED, BLOCK_H)
    for k in range(k_begin, K, BLOCK_K):
        w = load_weight_tile(w_ptrs, k, row_mask, cols, K)
        x = _load_input(x_ptr, k + cols, (k + cols) < K, K, SILU_MUL, residual_ptr, norm_w_ptr, rstd, NORM,
                        HAS_RESIDUAL)
        acc += w.to(tl.float32) * x[None, :]
    return tl.sum(acc, axis=1)


# `slot` alternates 0/1 from call to call: unspecialised, so one compiled kernel serves both.
@triton.autotune(configs=_CONFIGS, key=["N", "K", "SILU_MUL", "NORM"])
@triton.jit(do_not_specialize=["slot"])
def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, K, stride_wn,
                 buffer_ptrs, calls_ptr, slot, region_words,  # PUSH only (push_to_peers)
                 residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, eps,  # NORM only (NormArgs)
                 SILU_MUL: tl.constexpr, PUSH: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                 MAX_ROWS: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                 WRITE_NORMED: tl.constexpr, BLOCK_H: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y = row_block_sums(x_ptr, w_ptr, rows, row_mask, K, stride_wn, pid,
                       residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, eps,
                       SILU_MUL, BLOCK_K, PDL, NORM, HAS_RESIDUAL, WRITE_NORMED, BLOCK_H).to(y_ptr.dtype.element_ty)
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
    return _launch(x, weight, silu_mul, push, pdl, None)


def rms_norm_gemv(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                  residual: torch.Tensor | None = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gemv(rms_norm(x, norm_weight, eps, residual), weight), x + residual)` for x [1, K], bit for
    bit, in one launch; without `residual` the second is x itself (a first layer's residual)."""
    assert x.shape == (1, weight.shape[1]) and x.is_contiguous() and norm_weight.shape == (weight.shape[1],)
    if residual is None:
        norm = NormArgs(norm_weight, x, x, x, eps, has_residual=False, write_normed=False)
    else:
        assert residual.shape == x.shape and residual.is_contiguous()
        norm = NormArgs(norm_weight, residual, torch.empty_like(x), x, eps, has_residual=True, write_normed=False)
    return _launch(x, weight, False, None, pdl, norm), norm.residual_out


def plain_launch_args(y: torch.Tensor, norm: NormArgs | None = None, hidden: int = 0) -> tuple[tuple, dict]:
    """`_gemv_kernel`'s arguments after `stride_wn`, and its flags, for a GEMV without push, with
    `norm` (over `hidden` inputs) or without (for benchmarks that launch configurations of their own)."""
    norm = norm if norm is not None else NormArgs.off(y)
    return (y, y, 0, 0, *norm.kernel_args()), dict(PUSH=False, RANK=0, WORLD=1, MAX_ROWS=1, **norm.meta(hidden))




def _launch(x: torch.Tensor, weight: torch.Tensor, silu_mul: bool, push: "PushTarget | None", pdl: bool,
            norm: NormArgs | None) -> torch.Tensor:
    n, k = weight.shape
    assert x.numel() == x.shape[-1] == (2 * k if silu_mul else k)
    assert weight.stride(1) == 1
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    norm = norm if norm is not None else NormArgs.off(x)
    if push is not None:
        assert x.element_size() == 2 and n % 2 == 0, "pushed rows are words of two 16-bit elements"
        comm = (push.buffer_ptrs, push.call_counters, push.slot, push.region_words)
        meta = dict(PUSH=True, RANK=push.rank, WORLD=push.world_size, MAX_ROWS=push.call_counters.shape[1])
    else:
        comm = (y, y, 0, 0)  # not read
        meta = dict(PUSH=False, RANK=0, WORLD=1, MAX_ROWS=1)
    meta.update(PDL=pdl, **norm.meta(k), **launch_options(pdl))
    args = (x, weight, y, n, k, weight.stride(0), *comm, *norm.kernel_args())
    config = tuned_config(weight, silu_mul, pdl, norm.on)
    if config is not None:
        _gemv_kernel.fn[(triton.cdiv(n, config.block_n),)](
            *args, SILU_MUL=silu_mul, **meta, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _gemv_kernel[grid](*args, SILU_MUL=silu_mul, **meta)
    return y
