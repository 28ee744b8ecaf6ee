"""`CustomOp`: a layer with a plain-PyTorch implementation and, optionally, a CUDA one.

`forward_native` is the reference (and the CPU path); `forward_cuda` may call Triton kernels from
`tokenmill/ops/`. Which one runs is decided once, in `__init__`, from the build context's device,
so a model calls `self.norm(x, residual)` and never branches on the device per call. Subclasses
that need kernel modules import them in `__init__` when built for CUDA (CPU processes never import
Triton).
"""

from __future__ import annotations

from torch import nn

from tokenmill.model.build_context import build_context


class CustomOp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        context = build_context()
        cls = type(self)
        # The unbound function, not a bound method: a module holding a method bound to itself is a
        # reference cycle, and the engine frees its weights by dropping references.
        use_cuda = context.on_cuda and cls.forward_cuda is not CustomOp.forward_cuda
        self._impl = cls.forward_cuda if use_cuda else cls.forward_native

    @property
    def uses_cuda_kernels(self) -> bool:
        return self._impl is type(self).forward_cuda

    def forward(self, *args, **kwargs):
        return self._impl(self, *args, **kwargs)

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError

    def forward_cuda(self, *args, **kwargs):
        raise NotImplementedError
