"""Programmatic dependent launch (`ops/pdl.py`): the decode chain's kernels (norm, bf16 and fp8
GEMVs, rope + cache write, split-KV decode attention, MoE routing and the token-by-token experts)
launched dependent on one another, eagerly and replayed from a CUDA graph, give exactly what
ordinary launches give.

Each kernel of the chain reads what the one before wrote (and the GEMVs start reading weights
before they wait), so a missing or misplaced wait shows up as a wrong or stale row. Needs a GPU of
compute capability 9 or more; elsewhere the module is skipped.
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

from tokenmill.ops import pdl  # noqa: E402
from tokenmill.ops.attention_decode import new_split_counters, paged_decode  # noqa: E402
from tokenmill.ops.fp8_format import quantize_weight_blocks, quantize_weight_per_channel  # noqa: E402
from tokenmill.ops.fp8_gemv import fp8_gemv  # noqa: E402
from tokenmill.ops.fused_moe_gemv import fused_experts_gemv  # noqa: E402
from tokenmill.ops.gemv import gemv  # noqa: E402
from tokenmill.ops.kv_cache_write import rope_and_write_kv_cache  # noqa: E402
from tokenmill.ops.moe_routing import new_router_counter, route, route_from_hidden  # noqa: E402
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


@pytest.mark.parametrize("prefetch", [False, True], ids=["no_prefetch", "o_to_l2"])
@pytest.mark.parametrize("qk_norm", [False, True], ids=["rope", "qk_norm_rope"])
def test_attention_chain_matches_ordinary_launches_eagerly_and_in_a_graph(qk_norm, prefetch):
    """Norm -> QKV GEMV -> rope + cache write (with Qwen3's q/k norm fused in, or not) -> split-KV
    decode attention -> O GEMV for a batch-1 decode step, the attention kernels' inputs written by
    the kernels just before them. With `prefetch` the attention asks L2 for the O GEMV's weights
    as it starts (`l2_prefetch.py`: a hint, which must change nothing)."""
    torch.manual_seed(1)
    heads, kv_heads, head_dim, block_size, num_blocks = 8, 2, 128, 16, 64
    hidden = heads * head_dim
    norm = torch.rand(hidden, device=DEVICE, dtype=torch.bfloat16) + 0.5
    qkv_w = torch.randn((heads + 2 * kv_heads) * head_dim, hidden, device=DEVICE, dtype=torch.bfloat16) * hidden ** -0.5
    o_w = torch.randn(hidden, hidden, device=DEVICE, dtype=torch.bfloat16) * hidden ** -0.5
    cos_sin = torch.randn(2048, head_dim, device=DEVICE)
    qk_norm_args = dict(q_norm_weight=torch.rand(head_dim, device=DEVICE, dtype=torch.bfloat16) + 0.5,
                        k_norm_weight=torch.rand(head_dim, device=DEVICE, dtype=torch.bfloat16) + 0.5,
                        qk_norm_eps=1e-6) if qk_norm else {}
    block_table = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32)[None, :]
    counters = new_split_counters(kv_heads, DEVICE)
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, device=DEVICE, dtype=torch.bfloat16)

    def step(x, position, seq_len, slot, k_cache, v_cache, use_pdl):
        h = rms_norm(x, norm, 1e-5, pdl=use_pdl)
        q, k, v = gemv(h, qkv_w, pdl=use_pdl).split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], 1)
        q, k, v = q.view(1, heads, head_dim), k.view(1, kv_heads, head_dim), v.view(1, kv_heads, head_dim)
        rope_and_write_kv_cache(q, k, v, k_cache, v_cache, slot, position, cos_sin, pdl=use_pdl, **qk_norm_args)
        out = torch.empty_like(q)
        paged_decode(q, k_cache, v_cache, block_table, seq_len, out, num_blocks * block_size, head_dim ** -0.5,
                     split_counters=counters, pdl=use_pdl,
                     prefetch=o_w if use_pdl and prefetch else None)
        return gemv(out.view(1, hidden), o_w, pdl=use_pdl)

    def inputs(length):
        slot = block_table[0, (length - 1) // block_size].long() * block_size + (length - 1) % block_size
        return (torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16),
                torch.tensor([length - 1], device=DEVICE), torch.tensor([length], device=DEVICE, dtype=torch.int32),
                slot.view(1))

    cases = [inputs(length) for length in (1, 17, 300, 1000)]
    expected = []
    for case in cases:
        caches = cache.clone()
        expected.append((step(*case, caches[0], caches[1], use_pdl=False), caches))
    for case, (want, want_caches) in zip(cases, expected):
        caches = cache.clone()
        assert torch.equal(step(*case, caches[0], caches[1], use_pdl=True), want)
        assert torch.equal(caches, want_caches)

    static = [t.clone() for t in cases[-1]]
    caches = cache.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(*static, caches[0], caches[1], use_pdl=True)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(*static, caches[0], caches[1], use_pdl=True)
    for case, (want, want_caches) in zip(cases, expected):
        caches.copy_(cache)
        for dst, src in zip(static, case):
            dst.copy_(src)
        graph.replay()
        assert torch.equal(static_out, want) and torch.equal(caches, want_caches)


@pytest.mark.parametrize("fused_router", [False, True, "prefetch"], ids=["router", "fused_router", "fused_prefetch"])
def test_moe_chain_matches_ordinary_launches_eagerly_and_in_a_graph(fused_router):
    """Norm -> router GEMV -> routing (or both in one kernel, `route_from_hidden`) -> the experts'
    gate/up and down GEMVs, layer after layer at one token: each kernel reads the expert ids,
    weights or activations the one before wrote. `fused_prefetch`: the fused router also asks L2
    for the next layer's router weights (evict-last, `l2_prefetch.py`)."""
    torch.manual_seed(2)
    hidden, inter, experts, top_k = 512, 256, 32, 4
    layers = [(torch.rand(hidden, device=DEVICE, dtype=torch.bfloat16) + 0.5,
               torch.randn(experts, hidden, device=DEVICE, dtype=torch.bfloat16) * hidden ** -0.5,
               torch.randn(experts, 2 * inter, hidden, device=DEVICE, dtype=torch.bfloat16) * hidden ** -0.5,
               torch.randn(experts, hidden, inter, device=DEVICE, dtype=torch.bfloat16) * inter ** -0.5)
              for _ in range(LAYERS)]
    counter = new_router_counter(DEVICE)  # one for every layer: their launches never overlap

    def chain(x, residual, use_pdl):
        for i, (norm, router, w13, w2) in enumerate(layers):
            h, residual = rms_norm(x, norm, 1e-5, residual, pdl=use_pdl)
            if fused_router:
                prefetch = layers[(i + 1) % LAYERS][1] if use_pdl and fused_router == "prefetch" else None
                weights, ids, _ = route_from_hidden(h, router, top_k, False, True, 1.0, None, counter, pdl=use_pdl,
                                                    prefetch=prefetch)
            else:
                weights, ids = route(gemv(h, router, pdl=use_pdl), top_k, False, True, pdl=use_pdl)
            x = fused_experts_gemv(h, w13, w2, weights, ids, pdl=use_pdl)
        return x, residual

    inputs = [(torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16),
               torch.randn(1, hidden, device=DEVICE, dtype=torch.bfloat16)) for _ in range(4)]
    expected = [chain(x, r, use_pdl=False) for x, r in inputs]
    for (x, r), want in zip(inputs, expected):
        got = chain(x, r, use_pdl=True)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    static_x, static_r = (t.clone() for t in inputs[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static_x, static_r, use_pdl=True)  # compile before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = chain(static_x, static_r, use_pdl=True)
    for _ in range(3):
        for (x, r), want in zip(inputs, expected):
            static_x.copy_(x)
            static_r.copy_(r)
            graph.replay()
            assert torch.equal(static_out[0], want[0]) and torch.equal(static_out[1], want[1])


def test_supported_only_on_hopper_and_later():
    assert not pdl.supported(torch.device("cpu"))
    assert pdl.supported(DEVICE) == (torch.cuda.get_device_capability(DEVICE)[0] >= 9)
