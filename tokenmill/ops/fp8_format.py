"""fp8 (e4m3) number formats of fp8 linear layers' weights and activations, in plain torch (the
CPU path, the loaders, and the references of the Triton kernels `fp8_quant.py`, `fp8_gemm.py`,
`fp8_gemv.py`).

Weights (torch, once at load or in tests):
- block: `w ~= w_q * scale_inv[n // bn, k // bk]`, one float32 scale per `bn x bk` block (DeepSeek's
  `weight_scale_inv`; the last block of a dimension may be partial). `quantize_weight_blocks`.
- per channel: `w ~= w_q * scale[n]`, one scale per output row. `quantize_weight_per_channel`.
Each scale is `amax / 448` of its block or row, so the largest element maps to e4m3's largest.

Activations (at run time): `per_token_group_quant(x, group)` splits each row of `x [M, K]` into
groups of `group` features (the last may be partial) and returns `x_q [M, K]` (e4m3) and
`scales [M, ceil(K / group)]` float32 with `x ~= x_q * scale`; `group = K` is per-token
quantisation. Here the reference (`per_token_group_quant_ref`); the Triton kernel is
`fp8_quant.per_token_group_quant`. With `ue8m0`, scales are rounded up to powers of two
(DeepSeek-V3.1's `scale_fmt: ue8m0`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
_AMAX_EPS = 1e-10  # an all-zero group still gets a finite, nonzero scale


def _scale_of(amax: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    amax = amax.float().clamp(min=_AMAX_EPS)
    # A tensor divisor, not the Python float: CUDA torch turns `tensor / scalar` into a product
    # with the reciprocal (one ulp off IEEE division), and the Triton quantiser divides exactly.
    scale = amax / torch.full_like(amax, FP8_MAX)
    return round_up_to_power_of_two(scale) if ue8m0 else scale


def round_up_to_power_of_two(scale: torch.Tensor) -> torch.Tensor:
    """Positive float32 -> the smallest power of two >= it, on the bits (exact): a nonzero mantissa
    carries into the exponent, then the mantissa is cleared."""
    bits = scale.view(torch.int32)
    return ((bits + 0x7FFFFF) & -0x800000).view(torch.float32)


def _to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _pad_to(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, cols - x.shape[1], 0, rows - x.shape[0]))


def quantize_weight_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (w_q [N, K] e4m3, scale_inv [ceil(N/bn), ceil(K/bk)] float32)."""
    bn, bk = block
    n, k = weight.shape
    nb, kb = -(-n // bn), -(-k // bk)
    tiles = _pad_to(weight.float(), nb * bn, kb * bk).view(nb, bn, kb, bk)
    scale = _scale_of(tiles.abs().amax(dim=(1, 3)))  # [nb, kb]
    w_q = _to_fp8(tiles, scale[:, None, :, None]).view(nb * bn, kb * bk)[:n, :k].contiguous()
    return w_q, scale


def dequantize_weight_blocks(w_q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                             dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize_weight_blocks`, in `dtype` (computed in float32, rounded once)."""
    bn, bk = block
    n, k = w_q.shape
    scale = scale_inv.repeat_interleave(bn, dim=0)[:n].repeat_interleave(bk, dim=1)[:, :k]
    return (w_q.float() * scale).to(dtype)


def quantize_weight_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (w_q [N, K] e4m3, scale [N] float32)."""
    scale = _scale_of(weight.abs().amax(dim=1))
    return _to_fp8(weight, scale[:, None]), scale


def dequantize_weight_per_channel(w_q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (w_q.float() * scale[:, None]).to(dtype)


def per_token_group_quant_ref(x: torch.Tensor, group: int, ue8m0: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (x_q [M, K] e4m3, scales [M, ceil(K / group)] float32), in plain torch."""
    m, k = x.shape
    groups = -(-k // group)
    tiles = _pad_to(x.float(), m, groups * group).view(m, groups, group)
    scale = _scale_of(tiles.abs().amax(dim=2), ue8m0)
    x_q = _to_fp8(tiles, scale[:, :, None]).view(m, groups * group)[:, :k].contiguous()
    return x_q, scale



class ExpertScales(NamedTuple):
    """The scales of a MoE layer's fp8 experts (`ops/fused_moe.py`): `block = (bn, bk)` with
    `w13 [E, cdiv(2I, bn), cdiv(H, bk)]` and `w2 [E, cdiv(H, bn), cdiv(I, bk)]` (block-FP8
    checkpoints), or `block = None` with channel scales `w13 [E, 2I]` and `w2 [E, H]` (online
    fp8). `ue8m0`: activation scales rounded up to powers of two."""

    w13: torch.Tensor
    w2: torch.Tensor
    block: tuple[int, int] | None
    ue8m0: bool = False


def dequantize_experts(w_q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """Stacked expert weights [E, N, K] (e4m3) with `ExpertScales`-style scales -> `dtype`."""
    if block is None:
        return (w_q.float() * scale[:, :, None]).to(dtype)
    return torch.stack([dequantize_weight_blocks(w, s, block, dtype) for w, s in zip(w_q, scale)])
