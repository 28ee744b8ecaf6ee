"""A pre-norm block's norm handed to the module it feeds, with the modules built for CUDA: in a
batch-1 decode graph the norm runs inside the QKV GEMV (`RMSNorm.forward_then`), the dense MLP's
gate/up GEMV and the MoE layer's fused router (`forward_after_norm`), so no RMSNorm kernel is
launched, and what they return (the output and the new residual) equals the unfused path, the
norm's kernel then the module, bit for bit. Outside a decode graph, or at more than one row, the
norm's own kernel runs. On the GPU, or on the CPU under `TRITON_INTERPRET=1`."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch

from kernel_device import DEVICE, INTERPRET, CountLaunches  # noqa: E402  (skips the module without a GPU)

from layer_context import layers_for  # noqa: E402
from tokenmill.model.forward_context import ForwardContext, forward_context  # noqa: E402
from tokenmill.model.layers.layernorm import RMSNorm  # noqa: E402
from tokenmill.model.layers.linear import QKVParallelLinear  # noqa: E402
from tokenmill.model.layers.mlp import GatedMLP  # noqa: E402
from tokenmill.model.models.qwen_moe import QwenMoeSparseBlock  # noqa: E402
from tokenmill.ops import gemv as triton_gemv  # noqa: E402
from tokenmill.ops import rms_norm as rms_norm_ops  # noqa: E402

DTYPE = torch.float16 if INTERPRET else torch.bfloat16
_UNTUNED_GEMV = triton_gemv._gemv_kernel.fn
HIDDEN = 128
CONFIG = SimpleNamespace(hidden_size=HIDDEN, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                         moe_intermediate_size=64, hidden_act="silu")


class _FixedConfig:
    """Stands in for the autotuned GEMV: one configuration (and tuning needs a GPU)."""

    def __getitem__(self, grid):
        return functools.partial(_UNTUNED_GEMV[grid], BLOCK_N=8, BLOCK_K=64)


def _build(block: str):
    with layers_for("cuda"):
        norm = RMSNorm(HIDDEN, 1e-6)
        if block == "qkv":
            module = QKVParallelLinear(HIDDEN, 32, 4, 2)
        elif block == "mlp":
            module = GatedMLP(HIDDEN, 96)
        else:
            module = QwenMoeSparseBlock(CONFIG, shared_expert=False)
    g = torch.Generator().manual_seed(len(block))
    for m in (norm, module):
        for name, param in m.named_parameters():
            values = (torch.rand(param.shape, generator=g) + 0.5 if "norm" in name or m is norm
                      else torch.randn(param.shape, generator=g) * HIDDEN ** -0.5)
            param.data = values.to(DTYPE).to(DEVICE)
    return norm, module


def _run(norm, module, block, x, residual):
    """(output, new residual) through the fused entry point."""
    if block == "qkv":
        return norm.forward_then(module, x, residual)
    return module.forward_after_norm(norm, x, residual)


# (FusedMoE places its expert map on the device it is built for: a CUDA device, so the MoE case
# runs on a GPU only; tests/gpu/test_moe_gpu.py runs the fused router inside whole models.)
@pytest.mark.parametrize("block", ["qkv", "mlp", pytest.param("moe", marks=pytest.mark.skipif(
    DEVICE.type != "cuda", reason="FusedMoE is built on the CUDA device"))])
@pytest.mark.parametrize("first_layer", [False, True])
def test_norm_runs_inside_the_module_in_batch1_decode_graphs(block, first_layer, monkeypatch):
    norm, module = _build(block)
    # One configuration for both paths (the tuner times the fused and plain variants apart).
    monkeypatch.setattr(triton_gemv, "_gemv_kernel", _FixedConfig())
    counted = CountLaunches(rms_norm_ops._rms_norm_kernel)
    monkeypatch.setattr(rms_norm_ops, "_rms_norm_kernel", counted)
    g = torch.Generator().manual_seed(7)
    for rows, in_graph in ((1, True), (1, False), (3, True)):
        x = (torch.randn(rows, HIDDEN, generator=g) * 2).to(DTYPE).to(DEVICE)
        residual = None if first_layer else (torch.randn(rows, HIDDEN, generator=g) * 3).to(DTYPE).to(DEVICE)
        with forward_context(ForwardContext(decode_graph=in_graph)):
            counted.launches = 0
            got, got_residual = _run(norm, module, block, x, residual)
            fused = counted.launches == 0
            if residual is None:
                normed, want_residual = norm(x), x
            else:
                normed, want_residual = norm(x, residual)
            want = module(normed)
        assert fused == (rows == 1 and in_graph), (rows, in_graph, counted.launches)
        assert torch.equal(got, want), (rows, in_graph)
        assert torch.equal(got_residual, want_residual), (rows, in_graph)
        assert residual is not None or got_residual is x
