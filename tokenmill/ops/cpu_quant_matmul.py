"""Products with GGUF block-quantised weights kept quantised on the CPU (`cpu_quant_matmul.cpp`):
4-bit (Q4_0 / Q4_1) and 8-bit (Q8_0) blocks against activations quantised to int8 per block of
32, multiplied with AVX512-VNNI integer dot products as llama.cpp does.

`pack` turns GGUF rows into the kernel's layout exactly (the file's fp16 scales and offsets, the
same 4- or 8-bit values, 16 rows interleaved); `matmul` multiplies. The activations' int8
rounding is the only error beyond the file's own (tests/unit/test_cpu_quant_matmul.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.ops import gguf_blocks
from tokenmill.ops.cpu_extension import extension

LANES = 16  # output rows interleaved in one group (the kernel's vector lanes)
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


@dataclass(frozen=True)
class PackedBlocks:
    """A weight in the kernel's layout: `qs` uint8 [groups, K / 32, 256 or 512] (16 rows a group,
    rows padded to a multiple of 16), `d` and `m` fp16 [groups, K / 32, 16] (`m` None for 8 bits),
    `rows` the weight's real output features."""

    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    bits: int
    rows: int


def available() -> bool:
    """Whether the vectorised kernel runs here (the extension builds and the CPU has AVX512-VNNI);
    elsewhere the op still computes, by plain loops, and callers keep PyTorch's kernels."""
    return extension() is not None and bool(torch.ops.tokenmill.cpu_quant_matmul_vectorized())


def _interleave(per_row: torch.Tensor) -> torch.Tensor:
    """[N, blocks, ...] -> [groups, blocks, 16, ...] with rows padded to a multiple of 16 (zeros)."""
    rows = per_row.shape[0]
    padded = -(-rows // LANES) * LANES
    if padded != rows:
        per_row = torch.cat([per_row, per_row.new_zeros(padded - rows, *per_row.shape[1:])])
    grouped = per_row.view(padded // LANES, LANES, *per_row.shape[1:])
    return grouped.transpose(1, 2)


def pack(raw: torch.Tensor, kind: str) -> PackedBlocks:
    """GGUF rows (uint8 [N, row bytes]) of block type `kind` -> the kernel's layout."""
    if kind not in BITS:
        raise ValueError(f"GGUF block type {kind} has no quantised CPU kernel (supported: {', '.join(BITS)})")
    cells = gguf_blocks.blocks(raw, kind)
    rows, blocks = cells.shape[:2]
    d = cells[..., 0:2].contiguous().view(torch.float16).reshape(rows, blocks)
    if kind == "Q8_0":
        q = (cells[..., 2:].contiguous().view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        chunks = _interleave(q.view(rows, blocks, 8, 4))  # [groups, blocks, 16 rows, 8 chunks, 4]
        qs = chunks.permute(0, 1, 3, 2, 4)  # vector c: 16 rows x 4 bytes
        return PackedBlocks(qs.reshape(qs.shape[0], blocks, 512).contiguous(),
                            _interleave(d).contiguous(), None, 8, rows)
    q, _, _ = gguf_blocks.unpack_int4(raw, kind)  # int32 [N, K] in 0..15
    m = cells[..., 2:4].contiguous().view(torch.float16).reshape(rows, blocks) if kind == "Q4_1" else -8 * d
    chunks = _interleave(q.to(torch.uint8).view(rows, blocks, 4, 2, 4))  # [g, b, 16, vector i, low/high, 4]
    nibbles = chunks[..., 0, :] | (chunks[..., 1, :] << 4)  # [g, b, 16, 4 vectors, 4]
    qs = nibbles.permute(0, 1, 3, 2, 4)
    return PackedBlocks(qs.reshape(qs.shape[0], blocks, 256).contiguous(), _interleave(d).contiguous(),
                        _interleave(m).contiguous(), 4, rows)


def gather_rows(packed: PackedBlocks, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of the packed weight, dequantised (an embedding lookup in a quantised table): each
    row's bytes are picked out of its group's lane, no whole group is copied."""
    blocks = packed.qs.shape[1]
    flat = ids.reshape(-1)
    group, lane = flat // LANES, flat % LANES
    vectors = 8 if packed.bits == 8 else 4
    cells = packed.qs.view(packed.qs.shape[0], blocks, vectors, LANES, 4)
    # indices broadcast to [n, blocks, vectors]: each row's 4 bytes of every vector of every block
    picked = cells[group[:, None, None], torch.arange(blocks)[:, None], torch.arange(vectors), lane[:, None, None]]
    if packed.bits == 8:
        q = picked.reshape(-1, blocks, 32).float() - 128
    else:
        q = torch.stack([picked & 0xF, picked >> 4], dim=3).reshape(-1, blocks, 32).float()
    rows = q * packed.d[group, :, lane].float().unsqueeze(-1)
    if packed.m is not None:
        rows = rows + packed.m[group, :, lane].float().unsqueeze(-1)
    return rows.reshape(*ids.shape, blocks * 32).to(dtype)


def dequantize(packed: PackedBlocks) -> torch.Tensor:
    """The packed weight as float32 [N, K]."""
    return gather_rows(packed, torch.arange(packed.rows), torch.float32)


def matmul(x: torch.Tensor, packed: PackedBlocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (bf16 or float32) @ W.T (+ bias) -> [M, N] in x's dtype."""
    return torch.ops.tokenmill.cpu_quant_matmul(x, packed.qs, packed.d, packed.m, packed.bits, packed.rows, bias)


def matmul_reference(x: torch.Tensor, packed: PackedBlocks, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same arithmetic by the kernel's plain loops (the path of CPUs without AVX512-VNNI)."""
    return torch.ops.tokenmill.cpu_quant_matmul_reference(x, packed.qs, packed.d, packed.m, packed.bits,
                                                          packed.rows, bias)
