"""The attention backend an engine runs, by name (`--attention-backend`), in its dense and its
latent (MLA) form."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenmill.model.attention.backend import AttentionBackend

if TYPE_CHECKING:
    from tokenmill.model.attention.mla_backend import MLABackend


BACKENDS = ("torch_native", "cpu", "triton", "batch_invariant", "encoder")


def backend_class(name: str) -> type[AttentionBackend]:
    """`torch_native`, `cpu` (compiled CPU forward), `triton` or `batch_invariant` for decoders
    (imported on first use, so CPU processes never import Triton); `encoder` for embedding models
    (bidirectional, no KV cache)."""
    if name == "cpu":
        from tokenmill.model.attention.cpu import CpuBackend
        return CpuBackend
    if name == "torch_native":
        from tokenmill.model.attention.torch_native import TorchNativeBackend
        return TorchNativeBackend
    if name == "triton":
        from tokenmill.model.attention.triton import TritonBackend
        return TritonBackend
    if name == "batch_invariant":
        from tokenmill.model.attention.batch_invariant import BatchInvariantBackend
        return BatchInvariantBackend
    if name == "encoder":
        from tokenmill.model.attention.encoder import EncoderBackend
        return EncoderBackend
    raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")


def mla_backend_class(name: str) -> type["MLABackend"]:
    """The MLA form of backend `name` (`mla_backend.py`), imported on first use likewise."""
    if name == "torch_native":
        from tokenmill.model.attention.mla_torch_native import TorchNativeMLABackend
        return TorchNativeMLABackend
    if name == "triton":
        from tokenmill.model.attention.mla_triton import TritonMLABackend
        return TritonMLABackend
    raise ValueError(f"unknown attention backend {name!r}; choose from torch_native, triton")
