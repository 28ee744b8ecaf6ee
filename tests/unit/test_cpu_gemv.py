"""The CPU one-row GEMV (`ops/cpu_gemv.cpp`) against the float64 product of the same bf16 weights:
row counts around its four-row groups and the thread split, feature counts around the vector width
(the tail loop), bias, bf16 and float32 rows, what it refuses, and the linear method that sends
one-row products to it. Built as in the engine (a C++ compiler and ninja, which CI has)."""

from __future__ import annotations

import pytest
import torch

from layer_context import layers_for
from tokenmill.model.layers.linear import RowParallelLinear
from tokenmill.model.layers.linear_method import CpuLinearMethod
from tokenmill.ops import cpu_gemv

pytestmark = pytest.mark.skipif(not cpu_gemv.available(), reason="no C++ toolchain to build the kernel")


def _case(n: int, k: int, x_dtype: torch.dtype, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).bfloat16()
    x = torch.randn(1, k, generator=gen).to(x_dtype)
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    return x, w, b, ref


@pytest.mark.parametrize("n", [1, 3, 4, 5, 64, 963])
@pytest.mark.parametrize("k", [1, 31, 32, 33, 576, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_float64_product(n, k, bias):
    x, w, b, ref = _case(n, k, torch.bfloat16, bias, seed=n * 1000 + k)
    y = cpu_gemv.gemv(x, w, b)
    assert y.shape == (1, n) and y.dtype == torch.bfloat16
    # float32 sums of exact bf16 products, one rounding to bf16 (2**-8 relative) at the end.
    scale = (x.double().abs() @ w.double().abs().T + (b.double().abs() if bias else 0))
    assert torch.all((y.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-5 * scale)


def test_float32_rows_give_float32_sums():
    x, w, b, ref = _case(77, 300, torch.float32, True, seed=5)
    y = cpu_gemv.gemv(x, w, b)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), ref, rtol=1e-5, atol=1e-4)


def test_refuses_what_it_does_not_compute():
    w = torch.randn(8, 16).bfloat16()
    with pytest.raises(RuntimeError, match="one row"):
        cpu_gemv.gemv(torch.randn(2, 16).bfloat16(), w)
    with pytest.raises(RuntimeError, match="bf16 weight"):
        cpu_gemv.gemv(torch.randn(1, 16), w.float())
    with pytest.raises(RuntimeError, match="features"):
        cpu_gemv.gemv(torch.randn(1, 15).bfloat16(), w)
    assert not cpu_gemv.takes(torch.randn(2, 16).bfloat16(), w)
    assert not cpu_gemv.takes(torch.randn(1, 16).bfloat16(), w.float())
    assert not cpu_gemv.takes(torch.randn(1, 8).bfloat16(), torch.randn(16, 8).bfloat16()[::2])
    assert cpu_gemv.takes(torch.randn(1, 16).bfloat16(), w)


def test_linear_method_sends_one_row_to_the_gemv(monkeypatch):
    """One row of a bf16 layer goes to the GEMV when the method has it; more rows, or without it,
    to oneDNN. Both agree within bf16 rounding."""
    with layers_for("cpu", cpu_native_decode=True), torch.device("cpu"):
        layer = RowParallelLinear(96, 40, bias=True).bfloat16()
    layer.weight.data.copy_(torch.randn(40, 96))
    layer.bias.data.copy_(torch.randn(40))
    assert layer.method.native_gemv  # built with the kernels on
    calls = []
    real = cpu_gemv.gemv
    monkeypatch.setattr(cpu_gemv, "gemv", lambda *a: calls.append(a[0].shape) or real(*a))
    x = torch.randn(3, 96).bfloat16()
    one, _ = layer.method.apply(layer, x[:1], layer.bias)
    many, _ = layer.method.apply(layer, x, layer.bias)
    assert calls == [torch.Size([1, 96])]
    assert torch.allclose(one.float(), many[:1].float(), rtol=2 ** -7, atol=1e-2)
    plain = CpuLinearMethod(pack=False, native_gemv=False)
    plain_one, _ = plain.apply(layer, x[:1], layer.bias)
    assert calls == [torch.Size([1, 96])]
    assert torch.allclose(one.float(), plain_one.float(), rtol=2 ** -7, atol=1e-2)
