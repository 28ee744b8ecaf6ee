"""fp8 linear methods: e4m3 weights with float32 scales, activations quantised at run time.

- `BlockFp8LinearMethod` (block-FP8 checkpoints): `weight [out, in]` e4m3 and `weight_scale_inv
  [cdiv(out, bn), cdiv(in, bk)]`, loaded as the checkpoint stores them (HF/DeepSeek names), the
  scales sharded with their blocks. A layer whose shard would cut a block (a tensor-parallel split,
  or a merged part that does not start on a block) is refused when it is built.
- `OnlineFp8LinearMethod` (`quantization="fp8"` on an unquantised checkpoint): the weight loads in
  the model dtype and is quantised once after loading, one scale per output channel
  (`weight_scale [out]`); peak memory while loading is the unquantised model's.

How they multiply, chosen once at build:
- CUDA with fp8 tensor cores (compute capability 8.9+): one row (batch-1 decode) through the
  weight-only GEMV (`ops/fp8_gemv.py`, unless `--no-triton-gemv`), more rows through the w8a8
  GEMM with dynamic per-token(-group) activation scales (`ops/fp8_gemm.py`); products of
  `CUBLAS_MIN_ROWS` or more rows through cuBLAS's scaled fp8 GEMM where this torch takes the scale
  form (channel scales, or 128 x 128 blocks; unless `--no-cublas-fp8`).
- Elsewhere (CPU, older GPUs): the reference: the weight dequantised to the activations' dtype on
  every call, then `F.linear` (slow, exact to the stored weight; what HF transformers computes when
  it loads an fp8 checkpoint on such a device).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config.quantization import QuantizationConfig
from tokenmill.model.build_context import BuildContext
from tokenmill.model.layers.linear_method import LinearMethod
from tokenmill.ops.cpu_gemm import apply_activation
from tokenmill.ops.fp8_format import (
    FP8_DTYPE,
    dequantize_weight_blocks,
    dequantize_weight_per_channel,
    quantize_weight_per_channel,
)

# fp8 tensor cores (and Triton's e4m3 conversions) start with Ada / Hopper.
MIN_CAPABILITY = (8, 9)


def fp8_kernels_available(context: BuildContext) -> bool:
    return context.on_cuda and torch.cuda.get_device_capability(context.device) >= MIN_CAPABILITY


def fp8_linear_method(quant: QuantizationConfig, context: BuildContext) -> LinearMethod:
    kernels = fp8_kernels_available(context)
    gemv = kernels and context.kernels.triton_gemv
    block = tuple(quant.weight_block_size) if quant.block_fp8 else None
    cublas_rows = None
    if kernels and context.kernels.cublas_fp8:
        from tokenmill.ops import fp8_gemm
        if fp8_gemm.cublas_scaled_mm_supported(context.device, block):
            cublas_rows = fp8_gemm.CUBLAS_MIN_ROWS
    if quant.block_fp8:
        return BlockFp8LinearMethod(block, quant.ue8m0_activation_scales, kernels, gemv, cublas_rows, context.pdl)
    return OnlineFp8LinearMethod(kernels, gemv, cublas_rows, context.pdl)


class Fp8LinearMethod(LinearMethod):
    """Shared by both forms: `block` is (bn, bk) for block scales, None for channel scales;
    `kernels`: the Triton kernels (else the dequantising reference); `gemv`: one-row products
    through the GEMV; `cublas_rows`: products of this many rows or more through cuBLAS (None: never);
    `pdl`: the GEMV launches dependent on the kernel before (`ops/pdl.py`)."""

    scale_name: str  # the scale parameter's name on the layer

    def __init__(self, block: tuple[int, int] | None, ue8m0: bool, kernels: bool, gemv: bool,
                 cublas_rows: int | None = None, pdl: bool = False) -> None:
        self.block = block
        self.ue8m0 = ue8m0
        self.kernels = kernels
        self.gemv = gemv
        self.cublas_rows = cublas_rows
        if kernels:
            from tokenmill.ops import fp8_gemm, fp8_gemv
            self._linear = fp8_gemm.fp8_linear
            self._gemv = functools.partial(fp8_gemv.fp8_gemv, pdl=pdl)

    def dequantized_weight(self, layer: nn.Module, dtype: torch.dtype) -> torch.Tensor:
        scale = getattr(layer, self.scale_name)
        if self.block is not None:
            return dequantize_weight_blocks(layer.weight, scale, self.block, dtype)
        return dequantize_weight_per_channel(layer.weight, scale, dtype)

    def _one_row(self, x: torch.Tensor) -> bool:
        return self.gemv and x.dim() == 2 and x.shape[0] == 1

    def apply(self, layer, x, bias=None, push=None):
        if not self.kernels:
            y = F.linear(x, self.dequantized_weight(layer, x.dtype), bias)
        elif self._one_row(x):
            y = self._gemv(x, layer.weight, getattr(layer, self.scale_name), self.block)
            y = y if bias is None else y + bias
        else:
            y = self._linear(x, layer.weight, getattr(layer, self.scale_name), self.block, bias, self.ue8m0,
                             self.cublas_rows)
        return apply_activation(y, layer.activation), False

    def apply_silu_mul(self, layer, gate_up, silu_and_mul, bias=None, push=None):
        if not (self.kernels and self._one_row(gate_up)):
            return self.apply(layer, silu_and_mul(gate_up), bias, push)
        y = self._gemv(gate_up, layer.weight, getattr(layer, self.scale_name), self.block, silu_mul=True)
        return (y if bias is None else y + bias), False


class BlockFp8LinearMethod(Fp8LinearMethod):
    scale_name = "weight_scale_inv"

    def create_weights(self, layer, in_features, out_features):
        check_block_alignment(layer, self.block)
        bn, bk = self.block
        layer.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(
            torch.empty(-(-out_features // bn), -(-in_features // bk), dtype=torch.float32), requires_grad=False)

    def param_granularity(self, name):
        return self.block if name == "weight_scale_inv" else (1, 1)


class OnlineFp8LinearMethod(Fp8LinearMethod):
    scale_name = "weight_scale"

    def __init__(self, kernels: bool, gemv: bool, cublas_rows: int | None = None, pdl: bool = False) -> None:
        super().__init__(None, False, kernels, gemv, cublas_rows, pdl)

    def process_weights_after_loading(self, layer):
        if layer.weight.dtype == FP8_DTYPE:
            return  # quantised already (a second call)
        w_q, scale = quantize_weight_per_channel(layer.weight.data)
        layer.weight = nn.Parameter(w_q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)


def check_block_alignment(layer: nn.Module, block: tuple[int, int]) -> None:
    """Refuse a layer whose shard of a checkpoint tensor does not start on a weight block (and end
    on one, or at the end of both tensors): its scales could not be sharded with their blocks."""
    bn, bk = block
    ranges = [(r, bn, "output", layer.out_features) for r in layer.output_ranges()]
    ranges.append((layer.input_range(), bk, "input", layer.in_features))
    for r, b, what, dst_total in ranges:
        ends_together = r.src + r.size == r.src_total and r.dst + r.size == dst_total
        if r.dst % b or r.src % b or (r.size % b and not ends_together):
            tp = layer.tp
            raise ValueError(
                f"block-FP8 weights (weight_block_size {list(block)}) cannot be laid out in this "
                f"{type(layer).__name__} [{layer.out_features} x {layer.in_features}]: it holds {what} features "
                f"[{r.src}, {r.src + r.size}) of a {r.src_total}-wide checkpoint tensor at [{r.dst}, "
                f"{r.dst + r.size}) of its {dst_total} (tensor-parallel rank {tp.rank} of {tp.world_size}), "
                f"which does not start and end on {b}-feature blocks. Merged parts (q/k/v, gate/up) must each "
                f"be whole blocks, and a tensor-parallel split must cut on block boundaries (another "
                f"tensor_parallel_size may fit)")
