"""Build tokenmill layers outside an engine, as `model/registry.build_model` would: inside a build
context naming the device, the kernels and the tensor-parallel group (`TpFake` stands in for a
rank of a larger group without any process group)."""

from __future__ import annotations

import contextlib

import torch

from tokenmill.config.engine_config import KernelConfig
from tokenmill.config.quantization import QuantizationConfig
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.build_context import BuildContext, building


@contextlib.contextmanager
def layers_for(device: str = "cpu", rank: int = 0, world_size: int = 1, tp: TensorParallelGroup | None = None,
               quantization: QuantizationConfig | None = None, **kernels):
    """Layers built inside are for `device` and rank `rank` of `world_size` (or the group `tp`),
    with weights in the format `quantization` gives (None: unquantised)."""
    dev = torch.device(device)
    group = tp or TensorParallelGroup(rank, world_size, dev)
    defaults = dict(attention_backend="triton" if dev.type == "cuda" else "torch_native")
    with building(BuildContext(dev, KernelConfig(**{**defaults, **kernels}), group, quantization)) as context:
        yield context


class _BackendForTests:
    """An attention backend called as a test calls it: scale (and sliding window) per call, rope as
    (positions, table); one backend instance per head layout, as one per layer in a model."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._impls: dict = {}

    def forward(self, q, k, v, kv_cache, meta, scale, k_scale=1.0, v_scale=1.0, rope=None, sliding_window=None):
        from tokenmill.model.attention.selector import backend_class
        from tokenmill.model.layers.rotary_embedding import RotaryInputs

        key = (q.shape[1], k.shape[1], q.shape[2], scale, sliding_window)
        if key not in self._impls:
            with layers_for(str(q.device)):  # built as in a model, with the engine's default kernels
                self._impls[key] = backend_class(self.name)(*key)
        if isinstance(rope, tuple):
            rope = RotaryInputs(*rope)
        return self._impls[key].forward(q, k, v, kv_cache, meta, k_scale, v_scale, rope)


def attention_backend(name: str) -> _BackendForTests:
    return _BackendForTests(name)
