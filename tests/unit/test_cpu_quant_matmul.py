"""The CPU kernel for GGUF blocks kept quantised (`ops/cpu_quant_matmul.cpp`): int8 activations per
block of 32 against Q4_0 / Q4_1 / Q8_0 weights with VNNI integer dot products.

Its one approximation is the activations' int8 rounding, so it is checked two ways: against the
float64 product of the exactly dequantised weight with the activations rounded the same way (an
independent torch emulation: agreement to float32 rounding), and against the plain float64 product
(the rounding's own error, ~1% of the largest output). Shapes cover the 16-row groups (ragged
row counts are padded), the activation tiles of 4 / 2 / 1 rows and the 64-row chunks, block counts
that are not multiples of 16; both code paths (vectorised and the plain loops CPUs without VNNI
run) are exercised here. Built as in the engine (a C++ compiler and ninja, which CI has)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.benchmarks.kernels.cpu_quant_matmul import random_rows as benchmark_rows
from tokenmill.ops import cpu_quant_matmul, gguf_blocks
from tokenmill.ops.cpu_extension import extension

pytestmark = pytest.mark.skipif(extension() is None, reason="no C++ toolchain to build the kernel")

KINDS = ["Q4_0", "Q4_1", "Q8_0"]


def random_rows(n: int, k: int, kind: str, seed: int) -> torch.Tensor:
    return benchmark_rows(n, k, kind, torch.Generator().manual_seed(seed))


def emulated(x: torch.Tensor, raw: torch.Tensor, kind: str) -> torch.Tensor:
    """float64: the d * q part against x rounded to int8 per block of 32 (round half to even, as
    the kernel's nearbyint), the 4-bit offset part against the exact x."""
    m, k = x.shape
    blocks = x.float().view(m, k // 32, 32)  # float32 arithmetic, as the kernel's
    amax = blocks.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127 / amax, torch.zeros_like(amax))
    xq = (torch.round(blocks * inv).clamp(-127, 127).double() * (amax / 127).double()).view(m, k)
    w = gguf_blocks.dequantize(raw, kind).double()
    if kind == "Q8_0":
        return xq @ w.T
    q, scale, zero = gguf_blocks.unpack_int4(raw, kind)
    offset = (zero - 8 * scale).double().repeat_interleave(32, dim=1)  # the block's m
    return xq @ (w - offset).T + x.double() @ offset.T


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m,n,k", [(1, 16, 32), (1, 960, 576), (2, 7, 64), (3, 37, 96), (5, 33, 512),
                                   (9, 64, 1536), (70, 48, 160)])
def test_matches_the_emulated_product(kind, m, n, k):
    raw = random_rows(n, k, kind, seed=m * 7 + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    packed = cpu_quant_matmul.pack(raw, kind)
    ref = emulated(x, raw, kind)
    for fn in (cpu_quant_matmul.matmul, cpu_quant_matmul.matmul_reference):
        y = fn(x, packed)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-6, fn.__name__
    # The int8 rounding of the activations is the whole of the error against the exact product.
    exact = x.double() @ gguf_blocks.dequantize(raw, kind).double().T
    assert ((cpu_quant_matmul.matmul(x, packed).double() - exact).abs().max() / exact.abs().max()).item() < 3e-2


@pytest.mark.parametrize("kind", KINDS)
def test_pack_is_exact(kind):
    raw = random_rows(50, 96, kind, seed=3)
    packed = cpu_quant_matmul.pack(raw, kind)
    assert packed.rows == 50 and packed.qs.shape[0] == 4  # 50 rows -> four groups of 16
    assert torch.equal(cpu_quant_matmul.dequantize(packed), gguf_blocks.dequantize(raw, kind))


@pytest.mark.parametrize("kind", KINDS)
def test_gathered_rows_are_the_dequantised_rows(kind):
    """The embedding lookup in a table kept quantised."""
    raw = random_rows(70, 96, kind, seed=4)
    ids = torch.tensor([[0, 69, 17], [16, 15, 33]])
    rows = cpu_quant_matmul.gather_rows(cpu_quant_matmul.pack(raw, kind), ids, torch.float32)
    assert rows.shape == (2, 3, 96)
    assert torch.allclose(rows, gguf_blocks.dequantize(raw, kind)[ids], rtol=1e-6, atol=1e-7)


def test_bf16_rows_bias_and_zero_blocks():
    raw = random_rows(40, 128, "Q4_1", seed=9)
    x = torch.randn(6, 128).bfloat16()
    x[:, 32:64] = 0  # a block of zeros: scale 0, no division by it
    bias = torch.randn(40).bfloat16()
    packed = cpu_quant_matmul.pack(raw, "Q4_1")
    y = cpu_quant_matmul.matmul(x, packed, bias)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    ref = emulated(x.float(), raw, "Q4_1") + bias.double()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2 ** -7


def test_a_row_does_not_depend_on_the_others():
    """Each activation row is quantised on its own and summed in one order whatever the tile it
    lands in: the same row gives the same bits alone or in a batch (batch invariance)."""
    raw = random_rows(64, 576, "Q4_1", seed=1)
    packed = cpu_quant_matmul.pack(raw, "Q4_1")
    x = torch.randn(11, 576)
    batch = cpu_quant_matmul.matmul(x, packed)
    for i in range(11):
        assert torch.equal(cpu_quant_matmul.matmul(x[i:i + 1], packed), batch[i:i + 1])


def test_refuses_what_it_does_not_compute():
    packed = cpu_quant_matmul.pack(random_rows(16, 64, "Q8_0", seed=0), "Q8_0")
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.tokenmill.cpu_quant_matmul(torch.randn(1, 60), packed.qs, packed.d, None, 8, 16, None)
    with pytest.raises(RuntimeError, match="qs uint8"):
        cpu_quant_matmul.matmul(torch.randn(1, 96), packed)
    with pytest.raises(RuntimeError, match="4 bits need m"):
        torch.ops.tokenmill.cpu_quant_matmul(torch.randn(1, 64), packed.qs[..., :256].contiguous(), packed.d,
                                             None, 4, 16, None)
    with pytest.raises(ValueError, match="no quantised CPU kernel"):
        cpu_quant_matmul.pack(torch.zeros(16, 18 * 2, dtype=torch.uint8), "Q5_0")
