"""GGUF quantised weights kept quantised on the CPU: llama.cpp's Q4_0, Q4_1 and Q8_0 blocks
repacked into PyTorch's CPU weight-only kernels.

A GGUF weight `[out, in]` is stored row by row in blocks of 32 input features:

- Q4_0 (18 bytes): fp16 scale d, 16 bytes of 4-bit q (0..15); w = d * (q - 8).
- Q4_1 (20 bytes): fp16 scale d, fp16 minimum m, 16 bytes of q; w = d * q + m.
- Q8_0 (34 bytes): fp16 scale d, 32 int8 q; w = d * q.

Inside a 4-bit block, byte j holds element j in its low nibble and element j + 16 in its high one.

Both 4-bit types map exactly onto `_weight_int4pack_mm_for_cpu`, which computes with
w = (q - 8) * scale + zero per group of 32: Q4_0 is (d, 0), Q4_1 is (d, m + 8d); only the rounding
of scale and zero to the activation dtype differs from llama.cpp's fp16 values. Q8_0 has no
per-block int8 kernel in PyTorch: it is requantised to one scale per output row
(`_weight_int8pack_mm`), which adds at most half a row-scale step of error per weight where a row's
block scales differ. `dequantize` is the exact float reference every path is tested against.
"""

from __future__ import annotations

import torch

BLOCK = 32  # input features per block, every type here
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
INT4_TYPES = ("Q4_0", "Q4_1")
INT4_OUT_MULTIPLE = 16  # `_convert_weight_to_int4pack_for_cpu` packs output rows in sixteens


def blocks(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """uint8 `[out, in / 32 * bytes]` -> `[out, in / 32, bytes]`."""
    rows, row_bytes = raw.shape
    assert row_bytes % BLOCK_BYTES[kind] == 0, f"{kind} rows of {row_bytes} bytes"
    return raw.view(rows, row_bytes // BLOCK_BYTES[kind], BLOCK_BYTES[kind])


def _fp16(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """The fp16 at byte `offset` of every block, as float32 `[out, groups]`."""
    return blocks[..., offset:offset + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., 16]` -> int32 `[..., 32]` (low nibbles first, then high)."""
    return torch.cat([packed & 0xF, packed >> 4], dim=-1).to(torch.int32)


def unpack_int4(raw: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 rows -> (q int32 `[out, in]` in 0..15, scale and zero float32 `[out, in / 32]`)
    with w = (q - 8) * scale + zero."""
    cells = blocks(raw, kind)
    scale = _fp16(cells, 0)
    if kind == "Q4_0":
        zero = torch.zeros_like(scale)
        q = _nibbles(cells[..., 2:])
    else:
        zero = _fp16(cells, 2) + 8 * scale
        q = _nibbles(cells[..., 4:])
    return q.reshape(raw.shape[0], -1), scale, zero


def unpack_q8_0(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows -> (q int8 `[out, in / 32, 32]`, d float32 `[out, in / 32]`)."""
    cells = blocks(raw, "Q8_0")
    return cells[..., 2:].contiguous().view(torch.int8), _fp16(cells, 0)


def dequantize(raw: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference: float32 `[out, in]` weights of GGUF rows `raw` (uint8 `[out, row bytes]`)."""
    if kind in INT4_TYPES:
        q, scale, zero = unpack_int4(raw, kind)
        groups = q.view(q.shape[0], -1, BLOCK).float()
        return ((groups - 8) * scale[..., None] + zero[..., None]).reshape(q.shape)
    if kind == "Q8_0":
        q, d = unpack_q8_0(raw)
        return (q.float() * d[..., None]).reshape(raw.shape[0], -1)
    raise ValueError(f"GGUF block type {kind} is not supported (supported: {', '.join(BLOCK_BYTES)})")


def pack_int4(raw: torch.Tensor, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 rows -> (`_weight_int4pack_mm_for_cpu`'s packed weight uint8 `[out, in / 2]`,
    its scales and zeros `[in / 32, out, 2]` in `dtype`, the activation dtype)."""
    q, scale, zero = unpack_int4(raw, kind)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()
    return packed, scales_zeros


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """x `[tokens, in]` times a packed 4-bit weight -> `[tokens, out]`."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, BLOCK, scales_zeros)


def pack_int8(raw: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 rows -> (int8 `[out, in]`, one scale per row `[out]` in `dtype`), requantised to the
    row's largest block scale."""
    q, d = unpack_q8_0(raw)
    row_scale = d.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    values = q.float() * d[..., None]
    q_row = torch.round(values / row_scale[:, None, None]).clamp(-127, 127).to(torch.int8)
    return q_row.reshape(raw.shape[0], -1).contiguous(), row_scale.to(dtype)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x `[tokens, in]` times an int8 weight with per-row scales -> `[tokens, out]`."""
    return torch.ops.aten._weight_int8pack_mm(x, weight, scales)
