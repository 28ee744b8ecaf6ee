"""fp8 routed experts: `w13_weight` / `w2_weight` in e4m3 with float32 scales.

- Block-FP8 checkpoints (DeepSeek-V3, Kimi-K2, MiniMax-M2, Qwen3-MoE `-FP8`): each expert's
  `gate_proj` / `up_proj` / `down_proj` come with their `weight_scale_inv`, stacked like the
  weights: `w13_weight_scale_inv [E, cdiv(2I, bn), cdiv(H, bk)]`, `w2_weight_scale_inv
  [E, cdiv(H, bn), cdiv(I, bk)]`. Gate and up share one matrix, so this rank's share of the
  intermediate size must be whole blocks, and so must its tensor-parallel slice (refused when built).
- Online fp8 (`quantization="fp8"`): loaded in the model dtype, quantised after loading with one
  scale per output row of each expert (`w13_weight_scale [E, 2I]`, `w2_weight_scale [E, H]`).

The CUDA kernels (compute capability 8.9+) multiply the fp8 weights (`ops/fused_moe.py`: w8a8
grouped GEMMs, weight-only GEMVs for a few tokens); elsewhere the experts are dequantised to the
model dtype on every call and run the unquantised paths (slow, exact to the stored weights).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.layers.quantization.moe_method import MoeMethod
from tokenmill.ops.fp8_format import (
    FP8_DTYPE,
    ExpertScales,
    dequantize_experts,
    quantize_weight_per_channel,
)


class Fp8MoeMethod(MoeMethod):
    """`block`: (bn, bk) of a block-FP8 checkpoint, None for online per-channel fp8; `kernels`:
    the fp8 kernels run on this device."""

    def __init__(self, block: tuple[int, int] | None, ue8m0: bool, kernels: bool) -> None:
        self.block = block
        self.ue8m0 = ue8m0
        self.kernels = kernels
        self.suffix = "_weight_scale_inv" if block is not None else "_weight_scale"

    def create_weights(self, layer, num_experts, hidden_size, inter_per_rank):
        if self.block is None:
            super().create_weights(layer, num_experts, hidden_size, inter_per_rank)  # quantised after loading
            return
        _check_blocks(layer, self.block, inter_per_rank)
        bn, bk = self.block
        inter = inter_per_rank
        layer.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden_size, dtype=FP8_DTYPE),
                                        requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter, dtype=FP8_DTYPE),
                                       requires_grad=False)
        layer.w13_weight_scale_inv = nn.Parameter(
            torch.empty(num_experts, 2 * inter // bn, -(-hidden_size // bk), dtype=torch.float32), requires_grad=False)
        layer.w2_weight_scale_inv = nn.Parameter(
            torch.empty(num_experts, -(-hidden_size // bn), -(-inter // bk), dtype=torch.float32), requires_grad=False)

    def param_granularity(self, name):
        return self.block if self.block is not None and name.endswith("_scale_inv") else (1, 1)

    def process_weights_after_loading(self, layer):
        if self.block is not None or layer.w13_weight.dtype == FP8_DTYPE:
            return
        for name in ("w13", "w2"):
            weight = getattr(layer, f"{name}_weight").data
            quantised = [quantize_weight_per_channel(w) for w in weight]
            setattr(layer, f"{name}_weight", nn.Parameter(torch.stack([q for q, _ in quantised]), requires_grad=False))
            setattr(layer, f"{name}_weight_scale", nn.Parameter(torch.stack([s for _, s in quantised]),
                                                                requires_grad=False))

    def _scales(self, layer) -> ExpertScales:
        return ExpertScales(getattr(layer, "w13" + self.suffix), getattr(layer, "w2" + self.suffix), self.block,
                            self.ue8m0)

    def reference_weights(self, layer, dtype):
        scales = self._scales(layer)
        return (dequantize_experts(layer.w13_weight, scales.w13, self.block, dtype),
                dequantize_experts(layer.w2_weight, scales.w2, self.block, dtype))

    def kernel_weights(self, layer, dtype):
        if not self.kernels:
            return *self.reference_weights(layer, dtype), None
        return layer.w13_weight, layer.w2_weight, self._scales(layer)


def _check_blocks(layer: nn.Module, block: tuple[int, int], inter_per_rank: int) -> None:
    """This rank's slice of each expert's intermediate size must be whole blocks: it is both the
    rows of gate and up stacked in one matrix and the columns of down split across ranks."""
    bn, bk = block
    tp = layer.tp
    if inter_per_rank % bn or (tp.world_size > 1 and inter_per_rank % bk):
        raise ValueError(
            f"block-FP8 experts (weight_block_size {list(block)}) cannot be laid out with {inter_per_rank} "
            f"intermediate features per expert on each of {tp.world_size} tensor-parallel rank(s): gate and up "
            f"share one matrix and the ranks split it, so each rank's share must be whole {bn}-row blocks"
            + (f" (and {bk}-column blocks of down)" if tp.world_size > 1 else "")
            + "; choose a tensor_parallel_size that divides the expert intermediate size into whole blocks")
