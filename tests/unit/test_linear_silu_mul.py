"""`RowParallelLinear.forward_silu_mul` (the MLP's down projection taking the raw gate/up output):
where the batch-1 GEMV does not apply (here: the CPU, packed or not, any row count) it is exactly
`forward(SiluAndMul()(gate_up))`, and each tensor-parallel rank's shard pairs up with that rank's
gate/up shard. The fused GEMV's own exactness is tested in tests/gpu/kernels/test_triton_gemv.py."""

from __future__ import annotations

import pytest
import torch

from layer_context import layers_for
from tokenmill.model.forward_context import ForwardContext, forward_context
from tokenmill.model.layers import linear_method
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear


def _down(inter, hidden, dtype, bias):
    layer = RowParallelLinear(inter, hidden, bias=bias)
    torch.manual_seed(inter + hidden)
    layer.weight.data = (torch.randn(hidden, inter) * 0.05).to(dtype)
    if bias:
        layer.bias.data = torch.randn(hidden).to(dtype)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("in_graph", [False, True])
def test_forward_silu_mul_equals_activation_then_forward(dtype, rows, packed, in_graph):
    with layers_for("cpu"):
        down = _down(96, 40, dtype, bias=True)
        act = SiluAndMul()
    if packed:
        down.process_weights_after_loading()
        assert isinstance(down.method, linear_method.CpuLinearMethod)
    gate_up = (torch.randn(rows, 2 * 96) * 3).to(dtype)
    with forward_context(ForwardContext(decode_graph=in_graph)):
        fused = down.forward_silu_mul(gate_up, act)
        unfused = down(act(gate_up))
    assert torch.equal(fused, unfused)


def test_gemv_path_gets_the_raw_gate_up_and_bias(monkeypatch):
    """Where the GEMV applies (one row, inside a decode graph), it is called once with
    `silu_mul=True` on the un-activated input, and the bias is added after it."""
    with layers_for("cpu"):
        down = _down(64, 24, torch.float32, bias=True)
        act = SiluAndMul()
    gate_up = torch.randn(1, 128)
    expected = down(act(gate_up))
    calls = []
    method = object.__new__(linear_method.CudaLinearMethod)  # the CUDA method's logic, on CPU tensors
    method.triton_gemv = True
    method._gemv = lambda x, w, silu_mul=False, push=None: calls.append((x, silu_mul, push)) or \
        torch.nn.functional.linear(act(x), w)
    down.method = method
    with forward_context(ForwardContext(decode_graph=True)):
        out = down.forward_silu_mul(gate_up, act)
    assert len(calls) == 1 and calls[0][0] is gate_up and calls[0][1] is True and calls[0][2] is None
    torch.testing.assert_close(out, expected)
    with forward_context(ForwardContext(decode_graph=False)):  # eager: cuBLAS, no GEMV
        down.forward_silu_mul(gate_up, act)
    assert len(calls) == 1


@pytest.mark.parametrize("bias", [False, True])
def test_tensor_parallel_shards_pair_up(bias, monkeypatch):
    """Two ranks, each with its own gate/up and down shards: the partial sums add up to the
    single-rank MLP, the bias counted once (rank 0)."""
    hidden, inter = 32, 48
    torch.manual_seed(0)
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    down_w, down_b = torch.randn(hidden, inter) * 0.1, torch.randn(hidden)
    x = torch.randn(1, hidden)
    partials = []
    # Each rank's sum over ranks is intercepted: it returns the rank's own partial sum.
    monkeypatch.setattr("tokenmill.distributed.parallel_state.TensorParallelGroup.defer_sum",
                        lambda self, y, pushed=False: partials.append(y) or y)

    def mlp(tp, rank):
        with layers_for("cpu", rank=rank, world_size=tp):
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter])
            down = RowParallelLinear(inter, hidden, bias=bias)
            act = SiluAndMul()
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        down.weight_loader(down.weight, down_w)
        if bias:
            down.weight_loader(down.bias, down_b)
        with forward_context(ForwardContext()):
            return down.forward_silu_mul(gate_up(x), act)

    full = mlp(1, 0)
    assert partials == []  # one rank: nothing to sum
    torch.testing.assert_close(mlp(2, 0) + mlp(2, 1), full)
    assert len(partials) == 2
    ref = torch.nn.functional.linear(torch.nn.functional.silu(x @ gate.T) * (x @ up.T), down_w,
                                     down_b if bias else None)
    torch.testing.assert_close(full, ref)
