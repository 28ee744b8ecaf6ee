"""The gated MLP of Llama-family decoders (and of MoE models' shared and dense experts):
`down_proj(silu(gate_proj(x)) * up_proj(x))`, with gate and up merged into one matrix."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear


class GatedMLP(nn.Module):
    """`reduce_results=False`: under tensor parallelism, return this rank's partial output unsummed
    (a shared expert whose output the MoE layer sums over ranks together with the routed experts')."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, hidden_act: str = "silu",
                 reduce_results: bool = True) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"MLP activation {hidden_act!r} is not supported (silu)")
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias, reduce_results=reduce_results)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = down_proj(act_fn(gate_up_proj(x))); at batch-1 decode the activation runs inside the GEMV.
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x), self.act_fn)

    def forward_after_norm(self, norm: nn.Module, x: torch.Tensor,
                           residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(forward(norm(x + residual)), x + residual)` for `norm` an RMSNorm: the norm may run
        inside the gate/up projection (`RMSNorm.forward_then`)."""
        gate_up, residual = norm.forward_then(self.gate_up_proj, x, residual)
        return self.down_proj.forward_silu_mul(gate_up, self.act_fn), residual
