"""RMSNorm, with the residual add fused in: `norm(x)` or `norm(x, residual)`.

`norm(x, residual)` returns `(RMSNorm(x + residual), x + residual)`, the pre-norm decoder's step:
the sum is the next residual. Computed in float32 and rounded as HF's `LlamaRMSNorm` is, so
low-precision runs match the reference closely. On CUDA one Triton kernel does the add and the
norm in a single pass (`ops/rms_norm.py`).

Under tensor parallelism `x` may be a row-parallel layer's partial sum that the communicator
deferred to this norm (`distributed/symm_mem.py`): then the sum over ranks, the residual add and
the norm are one kernel (`ops/all_reduce_rms_norm.py`). The model that calls it cannot tell.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from tokenmill.model.build_context import build_context
from tokenmill.model.custom_op import CustomOp


class RMSNorm(CustomOp):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        context = build_context()
        self.tp = context.tp
        if self.uses_cuda_kernels:
            from tokenmill.ops import rms_norm
            self._kernel = functools.partial(rms_norm.rms_norm, pdl=context.pdl)
            if self.tp.world_size > 1:
                from tokenmill.ops import all_reduce_rms_norm
                self._fused_sum_kernel = all_reduce_rms_norm.all_reduce_add_rms_norm

    def forward_native(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        orig_dtype = x.dtype
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(orig_dtype)
        return out if residual is None else (out, residual)

    def forward_cuda(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None and self.tp.world_size > 1:
            fused = self.tp.take_deferred(x)
            if fused is not None:
                t = fused.target
                return self._fused_sum_kernel(x, residual, self.weight, self.eps, t.buffer_ptrs, t.call_counters,
                                              t.slot, t.region_words, t.rank, t.world_size, fused.pushed)
        return self._kernel(x, self.weight, self.eps, residual)
