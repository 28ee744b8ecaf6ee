"""How a `FusedMoE` layer (`layers/moe/fused_moe.py`) stores and multiplies its routed experts'
weights: the counterpart of `LinearMethod` for stacked experts, chosen when the layer is built.

A method owns the stacked parameters (`create_weights`: `w13_weight [E, 2I, H]`, `w2_weight
[E, H, I]`, plus scales for fp8 ones), says at which granularity the layer's `weight_loader`
shards each (`param_granularity`, along (rows, columns) of one expert's matrix), and hands the
layer what its two paths multiply by: `reference_weights` (the CPU path, `experts_ref`) and
`kernel_weights` (the CUDA kernels, `ops/fused_moe.fused_experts`).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.ops.fp8_format import ExpertScales


class MoeMethod:
    """Unquantised experts in the model dtype."""

    def create_weights(self, layer: nn.Module, num_experts: int, hidden_size: int, inter_per_rank: int) -> None:
        layer.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter_per_rank, hidden_size), requires_grad=False)
        layer.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, inter_per_rank), requires_grad=False)

    def param_granularity(self, name: str) -> tuple[int, int]:
        """Weight elements per entry of parameter `name`, along one expert's (rows, columns)."""
        return 1, 1

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def reference_weights(self, layer: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in a float dtype, for `experts_ref`."""
        return layer.w13_weight, layer.w2_weight

    def kernel_weights(self, layer: nn.Module, dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor, ExpertScales | None]:
        """(w13, w2, their fp8 scales or None) for `fused_experts`."""
        return layer.w13_weight, layer.w2_weight, None
