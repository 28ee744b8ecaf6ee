"""`linear(x, weight, packed, bias)`: the one place a layer's matrix product picks its kernel.

- CPU with a oneDNN-packed weight: `cpu_gemm` (faster GEMMs at decode shapes).
- CUDA, one row (batch-1 decode) and `TOKENMILL_TRITON_GEMV=1`: the Triton GEMV (`triton_gemv`).
- Otherwise `F.linear` (cuBLAS on CUDA).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tokenmill.model.layers import cpu_gemm

# Read once: the choice must be the same for every step (CUDA graphs capture it).
USE_TRITON_GEMV = os.environ.get("TOKENMILL_TRITON_GEMV", "0") == "1"


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    if packed is not None:
        return cpu_gemm.linear(x, weight, packed, bias)
    if USE_TRITON_GEMV and x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype:
        from tokenmill.model.layers.triton_gemv import gemv
        y = gemv(x, weight)
        return y if bias is None else y + bias
    return F.linear(x, weight, bias)
