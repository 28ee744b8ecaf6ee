"""The attention backend an engine runs, by name (`--attention-backend`)."""

from __future__ import annotations

from tokenmill.model.attention.backend import AttentionBackend


def backend_class(name: str) -> type[AttentionBackend]:
    """`torch_native`, `cpu` or `triton` (imported on first use, so CPU processes never import Triton)."""
    if name == "cpu":
        from tokenmill.model.attention.cpu import CpuBackend
        return CpuBackend
    if name == "torch_native":
        from tokenmill.model.attention.torch_native import TorchNativeBackend
        return TorchNativeBackend
    if name == "triton":
        from tokenmill.model.attention.triton import TritonBackend
        return TritonBackend
    raise ValueError(f"unknown attention backend {name!r}; choose from torch_native, cpu, triton")
