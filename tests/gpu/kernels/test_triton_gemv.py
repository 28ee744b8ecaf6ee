"""The batch-1 Triton GEMV (used inside decode CUDA graphs) against `F.linear` (the torch_native
path) on random inputs, and its fused SiLU-and-mul variant against the unfused kernels (bit for bit).

The autotuned tests need a GPU (tuning benchmarks on it); the exactness tests also run under
`TRITON_INTERPRET=1` on the CPU, each with one fixed kernel config in place of the tuner.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
import triton

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

from tokenmill.ops import gemv_configs as triton_gemv_configs  # noqa: E402
from tokenmill.ops import gemv as triton_gemv  # noqa: E402
from tokenmill.ops.gemv import gemv  # noqa: E402
from tokenmill.ops.activation import silu_and_mul  # noqa: E402

needs_autotune = pytest.mark.skipif(INTERPRET, reason="autotuning needs a GPU")


@needs_autotune
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 576), (37, 300), (151936, 1024), (8, 64)])
def test_gemv_matches_linear(n, k, dtype):
    torch.manual_seed(n + k)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) * 0.05
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    ref = F.linear(x.float(), w.float())
    out = gemv(x, w)
    assert out.shape == (1, n) and out.dtype == dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


@needs_autotune
def test_gemv_on_a_weight_shard_view():
    """A row-parallel shard is a view with its own row stride; the kernel must honour it."""
    full = torch.randn(512, 2048, dtype=torch.bfloat16, device=DEVICE)
    shard = full[100:356]  # rows of a larger matrix: stride(0) == 2048, contiguous rows
    x = torch.randn(1, 2048, dtype=torch.bfloat16, device=DEVICE)
    ref = F.linear(x.float(), shard.float())
    assert ((gemv(x, shard).float() - ref).norm() / ref.norm()).item() < 1e-2


_UNTUNED_KERNEL = triton_gemv._gemv_kernel.fn


class _FixedConfig:
    """Stands in for the autotuned `_gemv_kernel`: launches the plain kernel with one config."""

    def __init__(self, block_n: int, block_k: int) -> None:
        self.meta = {"BLOCK_N": block_n, "BLOCK_K": block_k}

    def __getitem__(self, grid):
        return functools.partial(_UNTUNED_KERNEL[grid], **self.meta)


def _config_used(w: torch.Tensor, silu_mul: bool) -> tuple:
    """(BLOCK_N, BLOCK_K, warps, stages) of the last `gemv` on `w`: the measured table's entry, or
    else the autotuner's pick (read right after the call)."""
    tuned = triton_gemv.tuned_config(w, silu_mul)
    if tuned is not None:
        return tuple(tuned)
    cfg = triton_gemv._gemv_kernel.best_config
    return (cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_warps, cfg.num_stages)


_SHAPES = [(37, 300), (64, 1000), (16, 2048), (5, 64)]  # K = 300, 1000: not a multiple of BLOCK_K


def _gate_up_and_weight(n, k, dtype, seed):
    torch.manual_seed(seed)
    gate_up = torch.randn(1, 2 * k, dtype=dtype, device=DEVICE) * 3  # well into silu's curved part
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) * 0.05
    return gate_up, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", _SHAPES)
@pytest.mark.parametrize("block_n,block_k", [(4, 512), (8, 256), (32, 128)])
def test_fused_silu_mul_is_bit_identical(n, k, dtype, block_n, block_k, monkeypatch):
    """gemv(gate_up, w, silu_mul=True) == gemv(silu_and_mul(gate_up), w) exactly, per config, so the
    fused batch-1 MLP cannot change a greedy token."""
    monkeypatch.setattr(triton_gemv, "_gemv_kernel", _FixedConfig(block_n, block_k))
    gate_up, w = _gate_up_and_weight(n, k, dtype, seed=n * k + block_n)
    unfused = gemv(silu_and_mul(gate_up), w)
    fused = gemv(gate_up, w, silu_mul=True)
    assert fused.shape == (1, n) and fused.dtype == dtype
    assert torch.equal(fused, unfused)
    ref = F.linear(silu_and_mul(gate_up).float(), w.float())
    assert ((fused.float() - ref).norm() / ref.norm()).item() < 1e-2  # and the product is right


@needs_autotune
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(4096, 14336), (2048, 7168), (576, 1536), (37, 300)])
def test_fused_silu_mul_is_bit_identical_autotuned(n, k, dtype):
    """As above with the tuner's pick (the fused and plain variants are tuned apart, so they may
    run different configs: the result must still be the same bits when they pick the same one)."""
    gate_up, w = _gate_up_and_weight(n, k, dtype, seed=n + k)
    fused = gemv(gate_up, w, silu_mul=True)
    fused_cfg = _config_used(w, silu_mul=True)
    act = silu_and_mul(gate_up)
    unfused = gemv(act, w)
    if _config_used(w, silu_mul=False) == fused_cfg:
        assert torch.equal(fused, unfused)
    ref = F.linear(act.float(), w.float())
    assert ((fused.float() - ref).norm() / ref.norm()).item() < 1e-2


def _norm_inputs(n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, k, generator=g) * 3).to(dtype).to(DEVICE)
    residual = (torch.randn(1, k, generator=g) * 2).to(dtype).to(DEVICE)
    norm_weight = (1 + 0.3 * torch.randn(k, generator=g)).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype).to(DEVICE)
    return x, residual, norm_weight, w


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,k", _SHAPES + [(40, 2048 + 6)])
@pytest.mark.parametrize("block_n,block_k", [(4, 512), (8, 256), (32, 128)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_norm_fused_gemv_is_bit_identical(n, k, dtype, block_n, block_k, with_residual, monkeypatch):
    """rms_norm_gemv == gemv(rms_norm(x, residual)) and its residual == rms_norm's, exactly, per
    config (also with dependent launches where the backend has them): a decoder layer's norm
    folded into the GEMV after it cannot change a greedy token. Without a residual (a first
    layer) the residual returned is x itself."""
    from tokenmill.ops.pdl import supported
    from tokenmill.ops.rms_norm import rms_norm
    monkeypatch.setattr(triton_gemv, "_gemv_kernel", _FixedConfig(block_n, block_k))
    x, residual, norm_weight, w = _norm_inputs(n, k, dtype, seed=n * k + block_n)
    residual = residual if with_residual else None
    eps = 1e-6
    if with_residual:
        normed, new_residual = rms_norm(x, norm_weight, eps, residual)
    else:
        normed, new_residual = rms_norm(x, norm_weight, eps), x
    unfused = gemv(normed, w)
    for pdl in (False, True) if supported(x.device) else (False,):
        fused, fused_residual = triton_gemv.rms_norm_gemv(x, norm_weight, eps, w, residual, pdl=pdl)
        assert fused.shape == (1, n) and fused.dtype == dtype
        assert torch.equal(fused, unfused), f"pdl={pdl}"
        assert torch.equal(fused_residual, new_residual) and (with_residual or fused_residual is x)
    ref_in = x.float() + (residual.float() if with_residual else 0)
    ref_in = ref_in.to(dtype).float()
    ref = F.linear((ref_in * torch.rsqrt(ref_in.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.float()),
                   w.float())
    assert ((fused.float() - ref).norm() / ref.norm()).item() < 2e-2  # and the product is right


@needs_autotune
@pytest.mark.parametrize("n,k", [(5120, 2048), (6144, 4096), (37, 300)])
def test_norm_fused_gemv_is_bit_identical_autotuned(n, k):
    """As above with the measured table or the tuner: the same bits where both variants run one
    configuration (the tuner times them apart)."""
    from tokenmill.ops.rms_norm import rms_norm
    x, residual, norm_weight, w = _norm_inputs(n, k, torch.bfloat16, seed=n + k)
    fused, new_residual = triton_gemv.rms_norm_gemv(x, norm_weight, 1e-5, w, residual)
    fused_cfg = _config_used(w, silu_mul=False)
    normed, ref_residual = rms_norm(x, norm_weight, 1e-5, residual)
    unfused = gemv(normed, w)
    assert torch.equal(new_residual, ref_residual)
    if _config_used(w, silu_mul=False) == fused_cfg:
        assert torch.equal(fused, unfused)
    ref = F.linear(normed.float(), w.float())
    assert ((fused.float() - ref).norm() / ref.norm()).item() < 1e-2


_TABLE_CONFIGS = sorted({c for table in triton_gemv_configs.TUNED.values() for c in table.values()})


@pytest.mark.parametrize("config", _TABLE_CONFIGS, ids=lambda c: f"{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("silu_mul", [False, True])
def test_measured_configs_compute_the_product(config, silu_mul):
    """Every configuration of the measured table (`gemv_configs.py`) gives the right product, on a
    shape that is no multiple of its blocks (the table is only consulted for its own shapes, on
    its GPU; this checks the configurations themselves)."""
    n, k = 37, 1000
    torch.manual_seed(n + config.block_n)
    x = torch.randn(1, 2 * k if silu_mul else k, dtype=torch.float16, device=DEVICE)
    w = torch.randn(n, k, dtype=torch.float16, device=DEVICE) * 0.05
    y = torch.empty(1, n, dtype=torch.float16, device=DEVICE)
    rest, flags = triton_gemv.plain_launch_args(y)
    _UNTUNED_KERNEL[(triton.cdiv(n, config.block_n),)](
        x, w, y, n, k, w.stride(0), *rest, SILU_MUL=silu_mul, **flags,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps, num_stages=config.num_stages)
    ref = F.linear((silu_and_mul(x) if silu_mul else x).float(), w.float())
    assert ((y.float() - ref).norm() / ref.norm()).item() < 1e-2


def test_measured_table_applies_to_its_own_shapes_only():
    w = torch.empty(3072, 4096, dtype=torch.bfloat16)
    assert triton_gemv_configs.tuned_config(w, silu_mul=False) is None  # not on a GPU
    if DEVICE.type == "cuda":
        on_gpu = torch.empty(3072, 4096, dtype=torch.bfloat16, device=DEVICE)
        expected = triton_gemv_configs.TUNED.get(torch.cuda.get_device_name(DEVICE), {}).get((3072, 4096, False))
        assert triton_gemv_configs.tuned_config(on_gpu, silu_mul=False) == expected
        assert triton_gemv_configs.tuned_config(on_gpu.float(), silu_mul=False) is None  # 4-byte weights
        assert triton_gemv_configs.tuned_config(on_gpu[:, :100], silu_mul=False) is None  # another shape


@pytest.mark.parametrize("norm", [True, False])
def test_dependent_launches_take_their_own_table_then_the_ordinary_one(norm):
    """A dependent launch takes `TUNED_PDL`'s entry for its shape and whether the norm is fused,
    else the ordinary table's; an ordinary launch never the dependent one's."""
    shape = (5120, 2048) if norm else (2048, 4096)
    if DEVICE.type != "cuda":
        w = torch.empty(*shape, dtype=torch.bfloat16)
        assert triton_gemv_configs.tuned_config(w, False, pdl=True, norm=norm) is None  # nothing off a GPU
        return
    w = torch.empty(*shape, dtype=torch.bfloat16, device=DEVICE)
    name = torch.cuda.get_device_name(DEVICE)
    ordinary = triton_gemv_configs.TUNED.get(name, {}).get((*shape, False))
    dependent = triton_gemv_configs.TUNED_PDL.get(name, {}).get((*shape, False, norm))
    assert triton_gemv_configs.tuned_config(w, False) == ordinary
    assert triton_gemv_configs.tuned_config(w, False, pdl=True, norm=norm) == (dependent or ordinary)
    other = triton_gemv_configs.TUNED_PDL.get(name, {}).get((*shape, False, not norm))
    assert triton_gemv_configs.tuned_config(w, False, pdl=True, norm=not norm) == (other or ordinary)
