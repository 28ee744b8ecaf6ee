"""One-row bf16 products on the CPU through the C++ kernel (`cpu_gemv.cpp`): the linears of a
batch-1 decode step, ~1.2-1.5x oneDNN's packed GEMM on SmolLM2's matrices streamed from memory
(`python -m tokenmill.benchmarks.kernels.cpu_gemv`)."""

from __future__ import annotations

import torch

from tokenmill.ops.cpu_extension import extension


def available() -> bool:
    """Whether the kernel is built on this machine (builds it on first use)."""
    return extension() is not None


def takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` computes this product: one row, a contiguous bf16 weight on the CPU."""
    return (x.dim() == 2 and x.shape[0] == 1 and weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
            and weight.is_contiguous() and x.dtype in (torch.bfloat16, torch.float32))


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` for x [1, K], weight [N, K] bf16: float32 sums, one rounding to x's dtype."""
    return torch.ops.tokenmill.cpu_gemv(x, weight, bias)
