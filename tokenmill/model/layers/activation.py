"""Activations: SiLU-and-mul, the gated MLP's (`[..., 2 * d]` -> `silu(gate) * up`, `[..., d]`).

Batch-invariant mode on the CPU (docs/rl.md): torch's vectorised SiLU and its scalar loop (which
takes the elements left over at the end of a thread's range, and where that end falls depends on
the tensor's size) differ in the last bit for a few percent of inputs, so an element's value would
depend on how many tokens share the step. `forward_invariant` spells SiLU as `x / (1 + exp(-x))`,
whose vector and scalar forms agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.build_context import build_context
from tokenmill.model.custom_op import CustomOp


class SiluAndMul(CustomOp):
    def __init__(self) -> None:
        super().__init__()
        if self.uses_cuda_kernels:
            from tokenmill.ops import activation
            self._kernel = activation.silu_and_mul
        elif build_context().kernels.batch_invariant:
            self._impl = type(self).forward_invariant

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    def forward_invariant(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        gate = x[..., :d].float()
        return (gate / (1.0 + torch.exp(-gate))).to(x.dtype) * x[..., d:]

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return self._kernel(x)
