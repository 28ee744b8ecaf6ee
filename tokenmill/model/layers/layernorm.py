"""RMSNorm, with the residual add fused in: `norm(x)` or `norm(x, residual)`.

`norm(x, residual)` returns `(RMSNorm(x + residual), x + residual)`, the pre-norm decoder's step:
the sum is the next residual. Computed in float32 and rounded as HF's `LlamaRMSNorm` is, so
low-precision runs match the reference closely. On CUDA one Triton kernel does the add and the
norm in a single pass (`ops/rms_norm.py`).

Under tensor parallelism `x` may be a row-parallel layer's partial sum that the communicator
deferred to this norm (`distributed/symm_mem.py`): then the sum over ranks, the residual add and
the norm are one kernel (`ops/all_reduce_rms_norm.py`). The model that calls it cannot tell.

`norm.forward_then(linear, x, residual)` is a pre-norm block's start, `linear(norm(x + residual))`
and the new residual: where the linear's product is the batch-1 GEMV (a decode graph, one
process), the norm runs inside it (`ops/gemv.rms_norm_gemv`, bit-identical), one launch a norm
fewer. The routed MoE layer does the same with its router (`FusedMoE.forward_after_norm`).
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

    def fuses_into(self, linear: nn.Module, x: torch.Tensor) -> bool:
        """Whether `forward_then(linear, x, ...)` runs this norm inside `linear`'s product: CUDA
        kernels, one process (under tensor parallelism x may be a partial sum that only this
        layer's kernel completes), and a linear method that takes it."""
        return self.uses_cuda_kernels and self.tp.world_size == 1 and linear.method.fuses_norm(linear, x)

    def forward_then(self, linear: nn.Module, x: torch.Tensor,
                     residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(linear(norm(x + residual)), x + residual)`; without `residual` (a first layer), `x`
        is the residual returned."""
        if self.fuses_into(linear, x):
            return linear.method.apply_after_norm(linear, self, x, residual)
        if residual is None:
            return linear(self(x)), x
        normed, residual = self(x, residual)
        return linear(normed), residual

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
