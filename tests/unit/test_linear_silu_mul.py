"""`RowParallelLinear.forward_silu_mul` (the MLP's down projection taking the raw gate/up output):
where the batch-1 GEMV does not apply (here: the CPU, packed or not, any row count) it is exactly
`forward(SiluAndMul()(gate_up))`, and each tensor-parallel rank's shard pairs up with that rank's
gate/up shard. The fused GEMV's own exactness is tested in tests/kernels/test_triton_gemv.py."""

from __future__ import annotations

import pytest
import torch

from tokenmill.distributed import parallel_state
from tokenmill.model.layers import matmul
from tokenmill.model.layers.basic import SiluAndMul
from tokenmill.model.layers.linear import MergedColumnParallelLinear, RowParallelLinear


def _down(inter, hidden, dtype, bias, reduce_results=True):
    layer = RowParallelLinear(inter, hidden, bias=bias, reduce_results=reduce_results)
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
    down = _down(96, 40, dtype, bias=True)
    if packed:
        down.pack_for_cpu()
    gate_up = (torch.randn(rows, 2 * 96) * 3).to(dtype)
    with matmul.decode_graph_kernels() if in_graph else torch.no_grad():
        fused = down.forward_silu_mul(gate_up)
        unfused = down(SiluAndMul()(gate_up))
    assert torch.equal(fused, unfused)


def test_gemv_path_gets_the_raw_gate_up_and_bias(monkeypatch):
    """Where the GEMV applies, it is called once with `silu_mul=True` on the un-activated input."""
    from tokenmill.model.layers import triton_gemv

    down = _down(64, 24, torch.float32, bias=True)
    gate_up = torch.randn(1, 128)
    expected = down(SiluAndMul()(gate_up))
    calls = []
    monkeypatch.setattr(matmul, "_use_gemv", lambda x, w: True)
    monkeypatch.setattr(triton_gemv, "gemv", lambda x, w, silu_mul=False, push=None: calls.append((x, silu_mul))
                        or torch.nn.functional.linear(SiluAndMul()(x), w))
    out = down.forward_silu_mul(gate_up)
    assert len(calls) == 1 and calls[0][0] is gate_up and calls[0][1] is True
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("bias", [False, True])
def test_tensor_parallel_shards_pair_up(bias, monkeypatch):
    """Two ranks, each with its own gate/up and down shards (`reduce_results=False`, as LlamaMLP):
    the partial sums add up to the single-rank MLP, the bias counted once (rank 0)."""
    hidden, inter = 32, 48
    torch.manual_seed(0)
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    down_w, down_b = torch.randn(hidden, inter) * 0.1, torch.randn(hidden)
    x = torch.randn(1, hidden)

    def mlp_partial(tp, rank):
        monkeypatch.setattr(parallel_state, "_TP_SIZE", tp)
        monkeypatch.setattr(parallel_state, "_TP_RANK", rank)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter])
        gate_up.weight_loader(gate_up.weight, gate, 0)
        gate_up.weight_loader(gate_up.weight, up, 1)
        down = RowParallelLinear(inter, hidden, bias=bias, reduce_results=False)
        down.weight_loader(down.weight, down_w)
        if bias:
            down.weight_loader(down.bias, down_b)
        return down.forward_silu_mul(gate_up(x))

    full = mlp_partial(1, 0)
    torch.testing.assert_close(mlp_partial(2, 0) + mlp_partial(2, 1), full)
    ref = torch.nn.functional.linear(SiluAndMul()(x @ torch.cat([gate, up]).T), down_w, down_b if bias else None)
    torch.testing.assert_close(full, ref)
