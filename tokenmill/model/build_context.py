"""What a layer needs to know when it is built: the device, the kernels the engine chose, the
tensor-parallel group it shards itself over, and how the model's weights are quantised.

`model/registry.build_model` opens the context around the model's construction; layers read it in
their `__init__` (never in `forward`), so each picks its implementation and its shard once. Models
and layers therefore take only their HF config and sizes as arguments.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch

from tokenmill.config.engine_config import KernelConfig
from tokenmill.config.quantization import QuantizationConfig
from tokenmill.distributed.parallel_state import TensorParallelGroup


@dataclass(frozen=True)
class BuildContext:
    device: torch.device
    kernels: KernelConfig
    tp: TensorParallelGroup
    quantization: QuantizationConfig | None = None  # linear layers' weight format (None: unquantised)

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def pdl(self) -> bool:
        """Whether the decode chain's Triton kernels launch dependent on the kernel before (`ops/pdl.py`)."""
        if not (self.kernels.pdl and self.on_cuda):
            return False
        from tokenmill.ops import pdl
        return pdl.supported(self.device)


_current: ContextVar[BuildContext | None] = ContextVar("tokenmill_build_context", default=None)


@contextlib.contextmanager
def building(context: BuildContext) -> Iterator[BuildContext]:
    """Layers constructed inside read `context` (`build_context()`)."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def build_context() -> BuildContext:
    context = _current.get()
    if context is None:
        raise RuntimeError("tokenmill layers are built inside model.build_context.building(...) "
                           "(model/registry.build_model opens it)")
    return context
