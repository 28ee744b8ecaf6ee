"""The fp8 paths of the fused MoE kernels (`ops/fused_moe.py`, `ops/fused_moe_gemv.py`) against
their torch references: the grouped GEMMs (w8a8) against `fused_experts_fp8_ref` (the same
quantisation of each GEMM's input, dequantised weights), the token-by-token GEMVs (weight-only)
against the layer's `experts_ref` on the dequantised weights; block scales (128 and 32, hidden
sizes that end in a partial block) and channel scales, experts held by another rank.

Float32 cases run on the GPU and under `TRITON_INTERPRET=1` on the CPU; bf16 and the real
Qwen3-30B-A3B expert shape need an fp8 GPU (compute capability 8.9+).
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

from tokenmill.model.layers.moe.fused_moe import experts_ref  # noqa: E402
from tokenmill.ops.fp8_format import (  # noqa: E402
    ExpertScales,
    dequantize_experts,
    quantize_weight_blocks,
    quantize_weight_per_channel,
)
from tokenmill.ops.fused_moe import fused_experts, fused_experts_fp8_ref  # noqa: E402

needs_gpu = pytest.mark.skipif(INTERPRET or not (torch.cuda.is_available() and
                                                 torch.cuda.get_device_capability() >= (8, 9)),
                               reason="needs an fp8 GPU (compute capability 8.9+)")


def _fp8_experts(num_experts, hidden, inter, block, seed, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    quantise = (lambda w: quantize_weight_blocks(w, block)) if block else quantize_weight_per_channel
    q13, q2 = [quantise(w) for w in w13], [quantise(w) for w in w2]
    stack = lambda pairs, i: torch.stack([p[i] for p in pairs]).to(device)  # noqa: E731
    return stack(q13, 0), stack(q2, 0), ExpertScales(stack(q13, 1), stack(q2, 1), block)


def _routing(num_tokens, top_k, num_experts, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    return ids.to(torch.int32), torch.rand(num_tokens, top_k, generator=g)


CASES = [  # T, H, I, E, k, block, expert parallel
    (9, 256, 128, 8, 2, (128, 128), False),
    (33, 320, 128, 16, 4, (128, 128), False),  # H = 2.5 blocks
    (17, 96, 64, 8, 3, (32, 32), True),  # half the experts on another rank
    (12, 200, 96, 8, 2, None, False),  # channel scales (online fp8)
    (3, 128, 64, 4, 2, None, True),
]


def _inputs(case, dtype):
    num_tokens, hidden, inter, num_experts, top_k, block, parallel = case
    w13, w2, scales = _fp8_experts(num_experts, hidden, inter, block, seed=hidden + inter)
    ids, weights = _routing(num_tokens, top_k, num_experts, seed=num_tokens)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    expert_map = None
    if parallel:  # this rank holds the even experts, in local slots 0, 1, ...
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[0::2] = torch.arange(num_experts // 2, dtype=torch.int32)
        w13, w2 = w13[0::2].contiguous(), w2[0::2].contiguous()
        scales = ExpertScales(scales.w13[0::2].contiguous(), scales.w2[0::2].contiguous(), block)
        expert_map = expert_map.to(DEVICE)
    return x.to(DEVICE), w13, w2, scales, ids.to(DEVICE), weights.to(DEVICE), expert_map


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grouped_fp8_matches_reference(case):
    x, w13, w2, scales, ids, weights, expert_map = _inputs(case, torch.float32)
    out = fused_experts(x, w13, w2, weights, ids, expert_map, path="grouped", scales=scales)
    ref = fused_experts_fp8_ref(x, w13, w2, weights, ids, scales, expert_map)
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gemv_fp8_matches_dequantised_experts(case):
    x, w13, w2, scales, ids, weights, expert_map = _inputs(case, torch.float32)
    x, ids, weights = x[:4], ids[:4], weights[:4]
    out = fused_experts(x, w13, w2, weights, ids, expert_map, path="gemv", scales=scales)
    local_map = expert_map if expert_map is not None else torch.arange(w13.shape[0], dtype=torch.int32, device=DEVICE)
    ref = experts_ref(x, dequantize_experts(w13, scales.w13, scales.block, torch.float32),
                      dequantize_experts(w2, scales.w2, scales.block, torch.float32), weights, ids, local_map)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_fp8_weights_without_scales_are_refused():
    x, w13, w2, scales, ids, weights, _ = _inputs(CASES[0], torch.float32)
    with pytest.raises(AssertionError, match="scales"):
        fused_experts(x, w13, w2, weights, ids)


@needs_gpu
@pytest.mark.parametrize("num_tokens", [1, 4, 64, 512])
def test_fp8_experts_at_qwen3_30b_a3b_shape_bf16(num_tokens):
    """128 experts of 2048 x 768, top-8, bf16 activations: both paths within bf16 + fp8 activation
    rounding of the reference."""
    w13, w2, scales = _fp8_experts(128, 2048, 768, (128, 128), seed=7)
    ids, weights = _routing(num_tokens, 8, 128, seed=num_tokens)
    x = torch.randn(num_tokens, 2048, device=DEVICE, dtype=torch.bfloat16)
    out = fused_experts(x, w13, w2, weights.to(DEVICE), ids.to(DEVICE), scales=scales)
    if num_tokens <= 4:  # the weight-only GEMV path
        ref = experts_ref(x.float(), dequantize_experts(w13, scales.w13, scales.block, torch.float32),
                          dequantize_experts(w2, scales.w2, scales.block, torch.float32), weights.to(DEVICE),
                          ids.to(DEVICE), torch.arange(128, dtype=torch.int32, device=DEVICE))
    else:
        ref = fused_experts_fp8_ref(x, w13, w2, weights.to(DEVICE), ids.to(DEVICE), scales)
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < 3e-2, rel


@needs_gpu
def test_fp8_experts_replay_in_a_cuda_graph():
    w13, w2, scales = _fp8_experts(16, 512, 256, (128, 128), seed=8)
    for num_tokens in (2, 48):  # the GEMV path and the grouped one
        ids, weights = _routing(num_tokens, 4, 16, seed=num_tokens)
        ids, weights = ids.to(DEVICE), weights.to(DEVICE)
        x = torch.randn(num_tokens, 512, device=DEVICE, dtype=torch.bfloat16)
        fused_experts(x, w13, w2, weights, ids, scales=scales)  # compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fused_experts(x, w13, w2, weights, ids, scales=scales)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, fused_experts(x, w13, w2, weights, ids, scales=scales), rtol=0, atol=0)
