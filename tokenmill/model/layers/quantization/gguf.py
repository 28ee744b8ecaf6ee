"""The linear method for GGUF weights kept quantised on the CPU (`quantization="gguf"`).

The layer's `weight` is created as the GGUF blocks themselves (uint8 `[out, in / 32, block bytes]`,
one entry per 32 input features: `param_granularity`), so the layer's loader shards and merges
them like any weight (q/k/v and gate/up stack row-wise), and after loading it is replaced by the
kernel's layout: the weight is held once, in the form the kernel reads. Two kernels, chosen at
build (`KernelConfig.gguf_int8_activations`):

- int8 activations (`ops/cpu_quant_matmul.py`, where the CPU has AVX512-VNNI): the activations
  are rounded to int8 per block of 32 and multiplied with integer dot products, as llama.cpp does;
  Q4_0, Q4_1 and Q8_0 keep the file's exact blocks.
- PyTorch's weight-only kernels on float activations (`ops/gguf_blocks.py`): Q4_0 / Q4_1 through
  `_weight_int4pack_mm_for_cpu`, Q8_0 requantised per row for `_weight_int8pack_mm`.

The block type is the file's, one for every linear layer (`KernelConfig.gguf_weight_type`).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.layers.linear_method import LinearMethod
from tokenmill.ops import cpu_quant_matmul, gguf_blocks
from tokenmill.ops.cpu_gemm import apply_activation


class GgufLinearMethod(LinearMethod):
    def __init__(self, kind: str, dtype: torch.dtype, int8_activations: bool = False) -> None:
        if kind not in gguf_blocks.BLOCK_BYTES:
            raise ValueError(f"GGUF block type {kind} cannot be kept quantised (supported: "
                             f"{', '.join(gguf_blocks.BLOCK_BYTES)})")
        self.kind = kind
        self.dtype = dtype  # the activations' (and so the torch kernels' scales')
        self.int8_activations = int8_activations
        self.scales: torch.Tensor | None = None  # the torch kernels' scales
        self.packed: cpu_quant_matmul.PackedBlocks | None = None  # the int8-activation kernel's weight

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        if in_features % gguf_blocks.BLOCK:
            raise ValueError(f"a {self.kind} weight needs input features divisible by {gguf_blocks.BLOCK}, "
                             f"got {in_features}")
        if (not self.int8_activations and self.kind in gguf_blocks.INT4_TYPES
                and out_features % gguf_blocks.INT4_OUT_MULTIPLE):
            raise ValueError(f"the 4-bit CPU kernel needs output features divisible by "
                             f"{gguf_blocks.INT4_OUT_MULTIPLE}, got {out_features}")
        blocks = in_features // gguf_blocks.BLOCK
        layer.weight = nn.Parameter(torch.empty(out_features, blocks, gguf_blocks.BLOCK_BYTES[self.kind],
                                                dtype=torch.uint8), requires_grad=False)

    def param_granularity(self, name: str) -> tuple[int, int]:
        return (1, gguf_blocks.BLOCK) if name == "weight" else (1, 1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if layer.weight.dim() != 3 or layer.weight.shape[-1] != gguf_blocks.BLOCK_BYTES[self.kind]:
            return  # in the kernel's layout already (a second call: weights woken from sleep)
        raw = layer.weight.data.flatten(1)  # the GGUF rows
        if self.int8_activations:
            self.packed = cpu_quant_matmul.pack(raw, self.kind)
            packed = self.packed.qs
        elif self.kind in gguf_blocks.INT4_TYPES:
            packed, self.scales = gguf_blocks.pack_int4(raw, self.kind, self.dtype)
        else:
            packed, self.scales = gguf_blocks.pack_int8(raw, self.dtype)
        layer.weight = nn.Parameter(packed, requires_grad=False)

    def apply(self, layer, x, bias=None, push=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.int8_activations:
            y = cpu_quant_matmul.matmul(x2, self.packed, bias)
        else:
            y = (gguf_blocks.int4_linear(x2, layer.weight, self.scales) if self.kind in gguf_blocks.INT4_TYPES
                 else gguf_blocks.int8_linear(x2, layer.weight, self.scales))
            y = y if bias is None else y + bias
        return apply_activation(y.view(*shape[:-1], y.shape[-1]), layer.activation), False
