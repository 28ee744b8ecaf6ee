"""The batch-1 fp8 GEMV: `x @ dequant(w_q).T` for one row of activations (decode), weight-only.

Batch-1 decode reads every weight once per token, so it runs at the bandwidth its matrix-vector
products reach; an e4m3 weight is half the bytes of a bf16 one. The activation is not quantised
(there is nothing to gain on one row): each program streams its weight rows once, widens them to
float32 and multiplies by `x` times the weight's scale, so the result is the product with the
dequantised weight, `fp8_gemv_ref`, as the CPU path computes it (`model/layers/quantization/fp8.py`).

Scales, as in `fp8_gemm.py`:
- block (`block = (bn, bk)`): a program's `BLOCK_N` rows lie inside one row block (BLOCK_N divides
  bn), so they share one row of `w_scale`; the scale of each K element is folded into `x` as it
  is loaded (`x[k] * w_scale[row_block, k // bk]`), and the inner loop is the bf16 GEMV's.
- channel (`block = None`): `w_scale [N]` multiplies each row's sum once at the end.

`silu_mul=True` takes the MLP's `[gate | up]` row and computes `silu(gate) * up` as it loads x,
rounded as `ops/activation.silu_and_mul` rounds it (`gemv._load_x`), so the down projection needs
no separate activation kernel.

Launch configuration: where `gemv_configs.TUNED_FP8` (`TUNED_FP8_PDL` for dependent launches) lists
the GPU, shape and scale form, its measured configuration (timed in a CUDA graph as the engine runs it: for the bf16 GEMV the
autotuner's `do_bench` picks were 2-10% slower there than the best); elsewhere Triton's autotuner on a GPU (per shape,
at the warm-up before the decode graphs are captured), over tiles of about the bf16 GEMV's
measured winners in bytes; a fixed one under the interpreter or when `config` is given (the
benchmark's sweep, `benchmarks/kernels/fp8.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.fp8_format import dequantize_weight_blocks, dequantize_weight_per_channel
from tokenmill.ops.gemv import _load_x, load_weight_tile
from tokenmill.ops.gemv_configs import GemvConfig, tuned_fp8_config
from tokenmill.ops.pdl import launch_options, pdl_enter


@triton.jit
def _accumulate(acc, w, x_ptr, s_row, k, cols, K, SILU_MUL: tl.constexpr, BLOCKWISE: tl.constexpr,
                SCALE_BLOCK_K: tl.constexpr):
    """acc + the weight tile at columns k .. k + BLOCK_K times x there (with block scales: x times
    its columns' scales, so the sum over a row needs no per-block rescaling)."""
    k_mask = (k + cols) < K
    x = _load_x(x_ptr, k + cols, k_mask, K, SILU_MUL)
    if BLOCKWISE:
        x = x * tl.load(s_row + (k + cols) // SCALE_BLOCK_K, mask=k_mask, other=0.0)
    return acc + w.to(tl.float32) * x[None, :]


@triton.jit
def _fp8_gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, N, K, stride_wn, stride_sn,
                     BLOCKWISE: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
                     SILU_MUL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    # BLOCKWISE: every row of this program is in row block (pid * BLOCK_N) // SCALE_BLOCK_N.
    s_row = s_ptr + ((pid * BLOCK_N) // SCALE_BLOCK_N).to(tl.int64) * stride_sn
    k_begin = 0
    if PDL:
        # Weights change only between steps (loading, updates), never in the kernel before this
        # one: the first tile is read while that kernel finishes.
        w = load_weight_tile(w_ptrs, 0, row_mask, cols, K)
        pdl_enter(PDL)
        acc = _accumulate(acc, w, x_ptr, s_row, 0, cols, K, SILU_MUL, BLOCKWISE, SCALE_BLOCK_K)
        k_begin = BLOCK_K
    for k in range(k_begin, K, BLOCK_K):
        w = load_weight_tile(w_ptrs, k, row_mask, cols, K)
        acc = _accumulate(acc, w, x_ptr, s_row, k, cols, K, SILU_MUL, BLOCKWISE, SCALE_BLOCK_K)
    y = tl.sum(acc, axis=1)
    if not BLOCKWISE:
        y = y * tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


# Few candidates: each is compiled at start-up (the warm-up before graph capture tunes every shape).
CONFIGS = [GemvConfig(4, 1024, 4, 2), GemvConfig(8, 1024, 8, 1), GemvConfig(8, 512, 4, 2), GemvConfig(16, 512, 8, 1),
           GemvConfig(16, 256, 4, 2), GemvConfig(32, 256, 8, 2), GemvConfig(2, 2048, 4, 2)]


def _fits_blocks(configs, named_args, **kwargs):
    """A program's rows must lie in one row block of the scales (BLOCK_N divides it)."""
    scale_block_n = kwargs.get("SCALE_BLOCK_N", named_args.get("SCALE_BLOCK_N", 1))
    fitting = [c for c in configs if not kwargs.get("BLOCKWISE") or scale_block_n % c.kwargs["BLOCK_N"] == 0]
    return fitting or configs[:1]


_fp8_gemv_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_N": c.block_n, "BLOCK_K": c.block_k}, num_warps=c.num_warps,
                           num_stages=c.num_stages) for c in CONFIGS],
    key=["N", "K", "SILU_MUL", "BLOCKWISE", "SCALE_BLOCK_N"],
    prune_configs_by={"early_config_prune": _fits_blocks})(_fp8_gemv_kernel)


def default_config(block: tuple[int, int] | None) -> GemvConfig:
    """The untuned configuration (interpreter): 8 rows of 512, halved until 8 divides the row block."""
    block_n = 8
    while block is not None and block[0] % block_n:
        block_n //= 2
    return GemvConfig(block_n, 512, 4, 1)


def fp8_gemv(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int] | None,
             silu_mul: bool = False, config: GemvConfig | None = None, pdl: bool = False) -> torch.Tensor:
    """x [1, K] (or [1, 2K] with `silu_mul`: gate then up) in bf16/fp16/fp32, w_q [N, K] e4m3
    (unit stride in K), w_scale [cdiv(N, bn), cdiv(K, bk)] for `block = (bn, bk)` else [N]
    -> [1, N] in x's dtype. `config`: a fixed launch configuration (default: autotuned on a GPU).
    `pdl`: launched dependent on the kernel before, as `gemv.gemv` is."""
    n, k = w_q.shape
    assert x.numel() == x.shape[-1] == (2 * k if silu_mul else k)
    assert w_q.stride(1) == 1
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], n, dtype=x.dtype, device=x.device)
    if block is not None:
        assert w_scale.shape == (triton.cdiv(n, block[0]), triton.cdiv(k, block[1]))
        scale_block_n, scale_block_k, stride_sn = block[0], block[1], w_scale.stride(0)
    else:
        assert w_scale.numel() == n
        w_scale = w_scale.reshape(n)
        scale_block_n, scale_block_k, stride_sn = 1, 1, 0
    args = (x, w_q, w_scale, y, n, k, w_q.stride(0), stride_sn)
    meta = dict(BLOCKWISE=block is not None, SCALE_BLOCK_N=scale_block_n, SCALE_BLOCK_K=scale_block_k,
                SILU_MUL=silu_mul, PDL=pdl, **launch_options(pdl))
    if config is None and x.is_cuda:
        config = tuned_fp8_config(w_q, silu_mul, block is not None, pdl)
    if config is None and x.is_cuda:
        _fp8_gemv_tuned[lambda m: (triton.cdiv(n, m["BLOCK_N"]),)](*args, **meta)
        return y
    config = config or default_config(block)
    assert block is None or block[0] % config.block_n == 0, "a program's rows must share one row of scales"
    _fp8_gemv_kernel[(triton.cdiv(n, config.block_n),)](
        *args, **meta, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
        num_stages=config.num_stages)
    return y


def fp8_gemv_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int] | None
                 ) -> torch.Tensor:
    """`fp8_gemv` in plain torch (without the fused activation): the dequantised weight in float32."""
    if block is not None:
        w = dequantize_weight_blocks(w_q, w_scale, block, torch.float32)
    else:
        w = dequantize_weight_per_channel(w_q, w_scale.reshape(-1), torch.float32)
    return (x.float() @ w.T).to(x.dtype)
