"""The fp8 linear kernels against their torch references (`ops/fp8_format.py` and the `*_ref`
beside each kernel), on random inputs with ragged shapes: activation quantisation (bit for bit),
the w8a8 GEMM (block and channel scales), the weight-only batch-1 GEMV, and the fp8 linear method
that calls them.

Everything runs on the GPU and under `TRITON_INTERPRET=1` on the CPU (`kernel_device`, which also
stands in for the interpreter's float -> e4m3 rounding); tests marked `needs_gpu` compare with
cuBLAS's fp8 GEMM (`torch._scaled_mm`) or capture CUDA graphs, and need an sm_89+ GPU.
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

from layer_context import layers_for  # noqa: E402
from tokenmill.config.quantization import QuantizationConfig  # noqa: E402
from tokenmill.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear  # noqa: E402
from tokenmill.model.layers.quantization.fp8 import BlockFp8LinearMethod, OnlineFp8LinearMethod  # noqa: E402
from tokenmill.ops.activation import silu_and_mul  # noqa: E402
from tokenmill.ops.fp8_format import (  # noqa: E402
    per_token_group_quant_ref,
    quantize_weight_blocks,
    quantize_weight_per_channel,
)
from tokenmill.ops.fp8_gemm import (  # noqa: E402
    GemmConfig,
    cublas_scaled_mm_supported,
    fp8_gemm,
    fp8_gemm_ref,
    fp8_linear,
    gemm_config,
)
from tokenmill.ops.fp8_gemv import CONFIGS as GEMV_CONFIGS  # noqa: E402
from tokenmill.ops.fp8_gemv import fp8_gemv, fp8_gemv_ref  # noqa: E402
from tokenmill.ops.fp8_quant import per_token_group_quant  # noqa: E402
from tokenmill.ops import pdl  # noqa: E402
from tokenmill.ops.gemv_configs import TUNED_FP8, TUNED_FP8_PDL, tuned_fp8_config  # noqa: E402

needs_gpu = pytest.mark.skipif(INTERPRET or not (torch.cuda.is_available() and
                                                 torch.cuda.get_device_capability() >= (8, 9)),
                               reason="needs an fp8 GPU (compute capability 8.9+)")
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# The GEMM against float32 sums of the same e4m3 products: Hopper's fp8 tensor-core instructions
# (wgmma, the large tiles) keep fewer accumulator bits inside one K tile (DeepSeek-V3's report:
# about 14), so a 128-term partial sum is off by ~1e-4 of its size before it is promoted to float32
# with its scales (measured on an H100: 3e-4 of the output's largest value at most; the small tiles'
# mma instructions agree to 1e-6). A wrong scale or tile is off by whole units of it.
GEMM_TOLERANCE = 1e-3


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def _weight(n: int, k: int, block, seed: int):
    torch.manual_seed(seed)
    w = torch.randn(n, k, device=DEVICE) * 0.05
    return quantize_weight_blocks(w, block) if block is not None else quantize_weight_per_channel(w)


# ----- activation quantisation -----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,group", [(1, 128, 128), (5, 300, 128), (17, 1024, 128), (3, 200, 64),
                                       (4, 1000, 1000), (2, 4096, 4096), (6, 96, 32)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_group_quant_is_the_reference_bit_for_bit(m, k, group, dtype, ue8m0):
    torch.manual_seed(m * k + group)
    x = (torch.randn(m, k, device=DEVICE) * 4).to(dtype)
    x[0, :min(group, k)] = 0  # an all-zero group gets a tiny, finite scale
    x_q, scales = per_token_group_quant(x, group, ue8m0)
    ref_q, ref_scales = per_token_group_quant_ref(x, group, ue8m0)
    assert scales.shape == (m, -(-k // group)) and x_q.shape == (m, k)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(x_q.view(torch.uint8), ref_q.view(torch.uint8))
    assert x_q.float().abs().max() <= 448


@pytest.mark.parametrize("m", [1, 7, 130])
def test_group_quant_token_major_scales(m):
    """The layout cuBLAS's block-scaled GEMM takes: the same scales, the token axis contiguous."""
    x = torch.randn(m, 384, device=DEVICE, dtype=torch.bfloat16)
    x_q, scales = per_token_group_quant(x, 128, m_major_scales=True)
    ref_q, ref_scales = per_token_group_quant(x, 128)
    assert scales.shape == (m, 3) and scales.stride() == (1, m)
    assert torch.equal(scales, ref_scales) and torch.equal(x_q.view(torch.uint8), ref_q.view(torch.uint8))
    padded_q, padded = per_token_group_quant(x, 128, m_major_scales=True, row_multiple=4)
    rows = -(-m // 4) * 4
    assert padded.shape == (rows, 3) and padded.stride() == (1, rows) and padded_q.shape == (rows, 384)
    assert torch.equal(padded[:m], ref_scales) and torch.equal(padded_q[:m].view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.all(padded[m:] == 1) and torch.all(padded_q[m:].float() == 0)


def test_group_quant_of_a_strided_row_view():
    """Rows of a wider tensor (the runner's views) quantise like a copy of them."""
    x = torch.randn(8, 512, device=DEVICE, dtype=torch.bfloat16)[:, :256]
    x_q, scales = per_token_group_quant(x, 128)
    ref_q, ref_scales = per_token_group_quant_ref(x.contiguous(), 128)
    assert torch.equal(scales, ref_scales) and torch.equal(x_q.view(torch.uint8), ref_q.view(torch.uint8))


# ----- the w8a8 GEMM -----

@pytest.mark.parametrize("block", [(128, 128), (64, 32), None])
@pytest.mark.parametrize("m,n,k", [(1, 256, 256), (7, 300, 260), (33, 130, 384), (130, 256, 200)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_matches_reference(m, n, k, block, bias):
    w_q, w_s = _weight(n, k, block, seed=m + n + k)
    x = torch.randn(m, k, device=DEVICE)
    x_q, x_s = per_token_group_quant_ref(x, block[1] if block else k)
    b = torch.randn(n, device=DEVICE) if bias else None
    out = fp8_gemm(x_q, x_s, w_q, w_s, block, torch.float32, b)
    ref = fp8_gemm_ref(x_q, x_s, w_q, w_s, block, torch.float32, b)
    assert out.shape == (m, n)
    assert (out - ref).abs().max() <= GEMM_TOLERANCE * ref.abs().max()


@pytest.mark.parametrize("config", sorted({gemm_config(m, 1, 1) for m in (1, 32, 128, 1024)}),
                         ids=lambda c: f"{c.block_m}x{c.block_n}g{c.group_m}w{c.num_warps}s{c.num_stages}")
def test_every_launch_configuration_computes_the_product(config: GemmConfig):
    """Each configuration the heuristic can pick, on a shape that is no multiple of its tiles."""
    m, n, k = 37, 200, 384
    w_q, w_s = _weight(n, k, (128, 128), seed=config.block_m)
    x_q, x_s = per_token_group_quant_ref(torch.randn(m, k, device=DEVICE), 128)
    out = fp8_gemm(x_q, x_s, w_q, w_s, (128, 128), torch.float32, config=config)
    ref = fp8_gemm_ref(x_q, x_s, w_q, w_s, (128, 128), torch.float32)
    assert (out - ref).abs().max() <= GEMM_TOLERANCE * ref.abs().max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(128, 128), None])
def test_fp8_linear_approximates_the_unquantised_product(dtype, block):
    """Quantisation pass + GEMM: within e4m3's error of the exact product, output in x's dtype."""
    torch.manual_seed(1)
    w = torch.randn(192, 320, device=DEVICE) * 0.05
    w_q, w_s = quantize_weight_blocks(w, block) if block else quantize_weight_per_channel(w)
    x = torch.randn(2, 9, 320, device=DEVICE).to(dtype)
    out = fp8_linear(x, w_q, w_s, block)
    assert out.shape == (2, 9, 192) and out.dtype == dtype
    assert _rel(out, x.float() @ w.T) < 0.06
    x_q, x_s = per_token_group_quant_ref(x.reshape(18, 320), block[1] if block else 320)
    ref = fp8_gemm_ref(x_q, x_s, w_q, w_s, block, dtype).view(2, 9, 192)
    assert _rel(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


# ----- the batch-1 GEMV -----

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(128, 128), (64, 32), None])
@pytest.mark.parametrize("n,k", [(37, 300), (256, 1024), (300, 260), (8, 64)])
def test_gemv_matches_the_dequantised_product(n, k, block, dtype):
    w_q, w_s = _weight(n, k, block, seed=n * k)
    x = torch.randn(1, k, device=DEVICE).to(dtype)
    out = fp8_gemv(x, w_q, w_s, block)
    ref = fp8_gemv_ref(x.float(), w_q, w_s, block)
    assert out.shape == (1, n) and out.dtype == dtype
    assert _rel(out, ref) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("config", GEMV_CONFIGS, ids=lambda c: f"{c.block_n}x{c.block_k}w{c.num_warps}s{c.num_stages}")
@pytest.mark.parametrize("block", [(128, 128), None])
def test_every_gemv_configuration_computes_the_product(config, block):
    """Each configuration the autotuner may pick, on a shape that is no multiple of its tiles."""
    n, k = 200, 1000
    w_q, w_s = _weight(n, k, block, seed=config.block_n * config.block_k)
    x = torch.randn(1, k, device=DEVICE)
    out = fp8_gemv(x, w_q, w_s, block, config=config)
    assert _rel(out, fp8_gemv_ref(x, w_q, w_s, block)) < 1e-6


_MEASURED = sorted({(config, dependent) for dependent, tables in ((False, TUNED_FP8), (True, TUNED_FP8_PDL))
                    for table in tables.values() for config in table.values()})


@pytest.mark.parametrize("config,dependent", _MEASURED,
                         ids=lambda v: f"{v.block_n}x{v.block_k}w{v.num_warps}s{v.num_stages}" if isinstance(v, tuple)
                         else ("pdl" if v else "ordinary"))
@pytest.mark.parametrize("block", [(128, 128), None])
def test_every_measured_gemv_configuration_computes_the_product(config, dependent, block):
    """The measured tables' configurations (gemv_configs.TUNED_FP8, TUNED_FP8_PDL), launched as the
    engine launches them, on a shape that is no multiple of their tiles."""
    n, k = 200, 1000
    w_q, w_s = _weight(n, k, block, seed=config.block_n * config.block_k)
    x = torch.randn(1, k, device=DEVICE)
    out = fp8_gemv(x, w_q, w_s, block, config=config, pdl=dependent and pdl.supported(DEVICE))
    assert _rel(out, fp8_gemv_ref(x, w_q, w_s, block)) < 1e-6


def test_dependent_launches_take_their_own_table_then_the_ordinary_one():
    w = torch.empty(4096, 4096, dtype=torch.float8_e4m3fn, device=DEVICE)
    key = (4096, 4096, False, "channel")
    if DEVICE.type != "cuda":
        assert tuned_fp8_config(w, False, False, pdl=True) is None  # nothing is measured off a GPU
        return
    name = torch.cuda.get_device_name(DEVICE)
    ordinary, dependent = TUNED_FP8.get(name, {}).get(key), TUNED_FP8_PDL.get(name, {}).get(key)
    assert tuned_fp8_config(w, False, False) == ordinary
    assert tuned_fp8_config(w, False, False, pdl=True) == (dependent or ordinary)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [(128, 128), None])
def test_gemv_fused_silu_mul_is_bit_identical(dtype, block):
    w_q, w_s = _weight(96, 384, block, seed=3)
    gate_up = (torch.randn(1, 768, device=DEVICE) * 3).to(dtype)
    config = GEMV_CONFIGS[1]  # the same configuration for both (the tuner may pick apart)
    fused = fp8_gemv(gate_up, w_q, w_s, block, silu_mul=True, config=config)
    assert torch.equal(fused, fp8_gemv(silu_and_mul(gate_up), w_q, w_s, block, config=config))


# ----- the linear method on the kernels -----

@pytest.mark.parametrize("rows", [1, 5])
def test_block_fp8_method_on_kernels_matches_the_reference_method(rows):
    """A gate/up + down pair on the Triton kernels against the dequantising reference: one row
    runs the weight-only GEMV (as the reference up to summation order), more rows the w8a8 GEMM
    (within activation quantisation's error)."""
    quant = QuantizationConfig("fp8", (128, 128), from_checkpoint=True)
    with layers_for(DEVICE.type, quantization=quant), torch.device(DEVICE):  # as the model builder does
        gate_up = MergedColumnParallelLinear(256, [384, 384])
        down = RowParallelLinear(384, 256)
    for layer, (n, k) in ((gate_up, (768, 256)), (down, (256, 384))):
        w_q, w_s = _weight(n, k, (128, 128), seed=n)
        layer.weight.data.copy_(w_q)
        layer.weight_scale_inv.data.copy_(w_s)
    reference = BlockFp8LinearMethod((128, 128), ue8m0=False, kernels=False, gemv=False)
    kernels = BlockFp8LinearMethod((128, 128), ue8m0=False, kernels=True, gemv=True)
    x = torch.randn(rows, 256, device=DEVICE, dtype=torch.bfloat16)
    h_ref, _ = reference.apply(gate_up, x)
    h, _ = kernels.apply(gate_up, x)
    y_ref, _ = reference.apply_silu_mul(down, h_ref, silu_and_mul)
    y, _ = kernels.apply_silu_mul(down, h_ref, silu_and_mul)
    tolerance = 1e-2 if rows == 1 else 0.06
    assert _rel(h, h_ref) < tolerance and _rel(y, y_ref) < tolerance


def test_online_method_on_kernels():
    torch.manual_seed(4)
    with (layers_for(DEVICE.type, quantization=QuantizationConfig("fp8", None, from_checkpoint=False)),
          torch.device(DEVICE)):
        layer = RowParallelLinear(320, 200)
    layer.weight.data.copy_(torch.randn(200, 320) * 0.05)
    layer.process_weights_after_loading()
    x = torch.randn(6, 320, device=DEVICE, dtype=torch.bfloat16)
    ref, _ = OnlineFp8LinearMethod(kernels=False, gemv=False).apply(layer, x)
    for method in (OnlineFp8LinearMethod(kernels=True, gemv=True), OnlineFp8LinearMethod(kernels=True, gemv=False)):
        assert _rel(method.apply(layer, x)[0], ref) < 0.06
        assert _rel(method.apply(layer, x[:1])[0], ref[:1]) < (1e-2 if method.gemv else 0.06)


# ----- GPU only -----

@needs_gpu
@pytest.mark.parametrize("m,n,k", [(512, 4096, 4096), (4096, 6144, 4096), (64, 14336, 4096), (1, 4096, 14336)])
def test_gemm_at_model_shapes(m, n, k):
    w_q, w_s = _weight(n, k, (128, 128), seed=m)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    x_q, x_s = per_token_group_quant(x, 128)
    out = fp8_gemm(x_q, x_s, w_q, w_s, (128, 128), torch.bfloat16)
    assert _rel(out, fp8_gemm_ref(x_q, x_s, w_q, w_s, (128, 128), torch.float32)) < 5e-3


@needs_gpu
def test_channel_scaled_gemm_matches_cublas_scaled_mm():
    """Channel scales are what `torch._scaled_mm` does with row-wise scales: the same product."""
    m, n, k = 256, 1024, 2048
    w_q, w_s = _weight(n, k, None, seed=5)
    x_q, x_s = per_token_group_quant(torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16), k)
    ours = fp8_gemm(x_q, x_s, w_q, w_s, None, torch.bfloat16)
    cublas = torch._scaled_mm(x_q, w_q.t(), scale_a=x_s.reshape(m, 1), scale_b=w_s.reshape(1, n),
                              out_dtype=torch.bfloat16)
    assert _rel(ours, cublas) < 5e-3


@needs_gpu
def test_fp8_linear_and_gemv_replay_in_a_cuda_graph():
    w_q, w_s = _weight(512, 1024, (128, 128), seed=6)
    x = torch.randn(8, 1024, device=DEVICE, dtype=torch.bfloat16)
    fp8_linear(x, w_q, w_s, (128, 128))  # compile outside the capture
    fp8_gemv(x[:1], w_q, w_s, (128, 128))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        many = fp8_linear(x, w_q, w_s, (128, 128))
        one = fp8_gemv(x[:1], w_q, w_s, (128, 128))
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(many, fp8_linear(x, w_q, w_s, (128, 128)))
    assert torch.equal(one, fp8_gemv(x[:1], w_q, w_s, (128, 128)))
    assert _rel(one, fp8_gemv_ref(x[:1].float(), w_q, w_s, (128, 128))) < 1e-2


needs_hopper = pytest.mark.skipif(INTERPRET or not (torch.cuda.is_available() and
                                                    torch.cuda.get_device_capability() == (9, 0)),
                                  reason="cuBLAS's block-scaled fp8 GEMM needs a Hopper GPU")


@needs_hopper
@pytest.mark.parametrize("block", [(128, 128), None])
def test_cublas_takes_both_scale_forms_on_hopper(block):
    assert cublas_scaled_mm_supported(DEVICE, block)


@needs_hopper
@pytest.mark.parametrize("block", [(128, 128), None])
@pytest.mark.parametrize("m", [1, 3, 100, 128, 301, 1000])
@pytest.mark.parametrize("n,k", [(256, 512), (384, 1536), (1024, 4096)])
@pytest.mark.parametrize("bias", [False, True])
def test_cublas_path_matches_reference(m, n, k, bias, block):
    """`fp8_linear` through cuBLAS (ragged token counts: block scales pad them to a multiple of 4)
    against the float32 product of the same quantised operands, and against the Triton kernel's."""
    w_q, w_s = _weight(n, k, block, seed=m + n)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    b = torch.randn(n, device=DEVICE, dtype=torch.bfloat16) if bias else None
    out = fp8_linear(x, w_q, w_s, block, b, cublas_min_rows=1)
    x_q, x_s = per_token_group_quant(x, block[1] if block else k)
    ref = fp8_gemm_ref(x_q, x_s, w_q, w_s, block, torch.float32, b)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()
    assert _rel(out, fp8_linear(x, w_q, w_s, block, b)) < 5e-3


@needs_hopper
def test_cublas_path_keeps_what_it_cannot_take_on_triton():
    """A side that is not whole 128-blocks (N = 200), K not a multiple of 4 blocks (cuBLAS
    multiplies K = 256 wrongly), or fewer rows than the threshold: the Triton kernel's result, bit
    for bit."""
    x = torch.randn(300, 256, device=DEVICE, dtype=torch.bfloat16)
    for n in (200, 256):
        w_q, w_s = _weight(n, 256, (128, 128), seed=8)
        assert torch.equal(fp8_linear(x, w_q, w_s, (128, 128), cublas_min_rows=1),
                           fp8_linear(x, w_q, w_s, (128, 128)))
    w_q, w_s = _weight(256, 256, None, seed=9)
    assert torch.equal(fp8_linear(x[:10], w_q, w_s, None, cublas_min_rows=64), fp8_linear(x[:10], w_q, w_s, None))


@needs_hopper
@pytest.mark.parametrize("block", [(128, 128), None])
def test_cublas_path_replays_in_a_cuda_graph(block):
    w_q, w_s = _weight(512, 1024, block, seed=10)
    x = torch.randn(254, 1024, device=DEVICE, dtype=torch.bfloat16)
    fp8_linear(x, w_q, w_s, block, cublas_min_rows=1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = fp8_linear(x, w_q, w_s, block, cublas_min_rows=1)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, fp8_linear(x, w_q, w_s, block, cublas_min_rows=1))
