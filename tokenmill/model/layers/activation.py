"""Activations: SiLU-and-mul, the gated MLP's (`[..., 2 * d]` -> `silu(gate) * up`, `[..., d]`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.custom_op import CustomOp


class SiluAndMul(CustomOp):
    def __init__(self) -> None:
        super().__init__()
        if self.uses_cuda_kernels:
            from tokenmill.ops import activation
            self._kernel = activation.silu_and_mul

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x)
