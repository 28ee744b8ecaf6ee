"""The attention backend an engine runs, by name (`--attention-backend`)."""

from __future__ import annotations

from tokenmill.model.attention.backend import AttentionBackend


BACKENDS = ("torch_native", "triton", "batch_invariant")


def backend_class(name: str) -> type[AttentionBackend]:
    """`torch_native`, `triton` or `batch_invariant` (imported on first use, so CPU processes
    never import Triton)."""
    if name == "torch_native":
        from tokenmill.model.attention.torch_native import TorchNativeBackend
        return TorchNativeBackend
    if name == "triton":
        from tokenmill.model.attention.triton import TritonBackend
        return TritonBackend
    if name == "batch_invariant":
        from tokenmill.model.attention.batch_invariant import BatchInvariantBackend
        return BatchInvariantBackend
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
