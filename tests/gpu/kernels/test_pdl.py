"""Programmatic dependent launch (`ops/pdl.py`): the decode chain's kernels launched dependent on
one another, eagerly and replayed from a CUDA graph, give exactly what ordinary launches give.

Each kernel of the chain reads what the one before wrote (and the GEMVs start reading weights
before they wait), so a missing or misplaced wait shows up as a wrong or stale row. Needs a GPU of
compute capability 9 or more; elsewhere the module is skipped.
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

from tokenmill.ops import pdl  # noqa: E402
from tokenmill.ops.fp8_format import quantize_weight_blocks, quantize_weight_per_channel  # noqa: E402
from tokenmill.ops.fp8_gemv import fp8_gemv  # noqa: E402
from tokenmill.ops.gemv import gemv  # noqa: E402
from tokenmill.ops.rms_norm import rms_norm  # noqa: E402

pytestmark = pytest.mark.skipif(INTERPRET or not pdl.supported(DEVICE),
                                reason="programmatic dependent launch needs a GPU of compute capability 9+")

HIDDEN, INTER, LAYERS = 1024, 2816, 6


def _layers():
    torch.manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        norm = torch.rand(HIDDEN, device=DEVICE, dtype=torch.bfloat16) + 0.5
        o = torch.randn(HIDDEN, HIDDEN, device=DEVICE, dtype=torch.bfloat16) * HIDDEN ** -0.5
        gate_up = quantize_weight_per_channel(torch.randn(2 * INTER, HIDDEN, device=DEVICE) * HIDDEN ** -0.5)
        down = quantize_weight_blocks(torch.randn(HIDDEN, INTER, device=DEVICE) * INTER ** -0.5, (128, 128))
        layers.append((norm, o, gate_up, down))
    return layers


def _chain(layers, x, residual, use_pdl: bool):
    """Norm -> bf16 GEMV -> fp8 GEMV (channel scales) -> fp8 GEMV with SiLU-and-mul (block scales),
    LAYERS times, each kernel fed the previous one's output."""
    for norm, o, (gu_q, gu_s), (d_q, d_s) in layers:
        h, residual = rms_norm(x, norm, 1e-5, residual, pdl=use_pdl)
        h = gemv(h, o, pdl=use_pdl)
        gate_up = fp8_gemv(h, gu_q, gu_s, None, pdl=use_pdl)
        x = fp8_gemv(gate_up, d_q, d_s, (128, 128), silu_mul=True, pdl=use_pdl)
    return x, residual


def test_dependent_launches_match_ordinary_ones_eagerly_and_in_a_graph():
    layers = _layers()
    inputs = [(torch.randn(1, HIDDEN, device=DEVICE, dtype=torch.bfloat16),
               torch.randn(1, HIDDEN, device=DEVICE, dtype=torch.bfloat16)) for _ in range(4)]
    expected = [_chain(layers, x, r, use_pdl=False) for x, r in inputs]  # also tunes every GEMV shape
    for (x, r), want in zip(inputs, expected):
        got = _chain(layers, x, r, use_pdl=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    static_x, static_r = (t.clone() for t in inputs[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _chain(layers, static_x, static_r, use_pdl=True)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = _chain(layers, static_x, static_r, use_pdl=True)
    for _ in range(3):  # replays back to back: each must see the inputs copied in before it
        for (x, r), want in zip(inputs, expected):
            static_x.copy_(x)
            static_r.copy_(r)
            graph.replay()
            assert torch.equal(static_out[0], want[0]) and torch.equal(static_out[1], want[1])


def test_supported_only_on_hopper_and_later():
    assert not pdl.supported(torch.device("cpu"))
    assert pdl.supported(DEVICE) == (torch.cuda.get_device_capability(DEVICE)[0] >= 9)
