"""The fp8 KV cache's number format (`kv_cache_dtype="fp8"`), in plain PyTorch.

K and V are stored as `float8_e4m3fn` with one per-tensor scale per layer for K and one for V:
`cache = (x / scale).clamp(-448, 448)` rounded to fp8, read back as `cache.float() * scale`. The
Triton kernels implement the same two formulas (`kv_cache_write._write_kv_kernel`,
`attention_common.load_kv_tile`); the `torch_native` backend and the tests use these.

Element ops on fp8 tensors are patchy in PyTorch (no CPU `index_copy_`), so indexing goes through
same-size `uint8` views, which every device supports.
"""

from __future__ import annotations

import torch

FP8_KV_DTYPE: torch.dtype | None = getattr(torch, "float8_e4m3fn", None)
FP8_E4M3_MAX = 448.0  # largest finite e4m3fn value; larger magnitudes saturate


def is_fp8(cache: torch.Tensor) -> bool:
    return FP8_KV_DTYPE is not None and cache.dtype == FP8_KV_DTYPE


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> fp8 e4m3fn, computed in float32."""
    return (x.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(FP8_KV_DTYPE)


def dequantize_fp8(cache: torch.Tensor, scale: float) -> torch.Tensor:
    """fp8 e4m3fn -> float32 values."""
    return cache.float() * scale


def as_storage(cache: torch.Tensor) -> torch.Tensor:
    """A view that indexing ops accept: uint8 for fp8 (same bytes), the tensor itself otherwise."""
    return cache.view(torch.uint8) if is_fp8(cache) else cache


def read_kv(cache_values: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Values gathered from a cache, in `dtype`; fp8 ones are dequantized with `scale` first."""
    if is_fp8(cache_values):
        return dequantize_fp8(cache_values, scale).to(dtype)
    return cache_values.to(dtype)
