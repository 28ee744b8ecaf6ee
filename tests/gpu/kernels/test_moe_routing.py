"""The one-kernel expert selection (`ops/moe_routing.py`) against `select_experts`, the router's
torch reference (HF's operations), for every routing without expert groups: softmax with and
without renormalisation, sigmoid with a correction bias, a scaling factor, expert counts no power
of two, logits in float32 and bfloat16. Runs on the GPU, or on the CPU under `TRITON_INTERPRET=1`."""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE  # noqa: E402  (skips the module without a GPU)

from tokenmill.model.layers.moe.router import RoutingConfig, select_experts  # noqa: E402
from tokenmill.ops.moe_routing import route  # noqa: E402

ROUTINGS = {
    "mixtral": RoutingConfig(top_k=2, renormalize=True),
    "qwen-no-renorm": RoutingConfig(top_k=4),
    "qwen3-renorm": RoutingConfig(top_k=8, renormalize=True),
    "minimax-m2": RoutingConfig(top_k=8, scoring="sigmoid", renormalize=True, correction_bias=True),
    "sigmoid-scaled": RoutingConfig(top_k=3, scoring="sigmoid", routed_scaling_factor=2.5),
    "top-1": RoutingConfig(top_k=1, routed_scaling_factor=0.5),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_experts", [60, 128])
@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_route_matches_select_experts(name, num_experts, dtype):
    routing = ROUTINGS[name]
    g = torch.Generator().manual_seed(num_experts)
    logits = (torch.randn(37, num_experts, generator=g) * 2).to(dtype)
    bias = torch.randn(num_experts, generator=g) * 0.2 if routing.correction_bias else None
    ref_weights, ref_ids = select_experts(logits, routing, bias)
    weights, ids = route(logits.to(DEVICE), routing.top_k, routing.scoring == "sigmoid", routing.renormalize,
                         routing.routed_scaling_factor, None if bias is None else bias.to(DEVICE))
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    ids, weights = ids.cpu().long(), weights.cpu()
    # bfloat16 logits tie often; among tied experts either is a right choice (torch's topk breaks
    # ties its own way), so: our experts are distinct and score as high as the reference's ...
    choice = logits.float().sigmoid() + (0 if bias is None else bias) if routing.scoring == "sigmoid" else logits.float()
    assert all(len(set(row)) == routing.top_k for row in ids.tolist())
    torch.testing.assert_close(choice.gather(1, ids).sort(dim=-1).values,
                               choice.gather(1, ref_ids.long()).sort(dim=-1).values, rtol=0, atol=0)
    # ... and where the choice is the same, so are the weights.
    same = (ids.sort(dim=-1).values == ref_ids.long().sort(dim=-1).values).all(dim=-1)
    assert same.all() if dtype == torch.float32 else same.float().mean() > 0.7
    order, ref_order = ids[same].sort(dim=-1), ref_ids[same].long().sort(dim=-1)
    torch.testing.assert_close(weights[same].gather(1, order.indices), ref_weights[same].gather(1, ref_order.indices),
                               rtol=2e-6, atol=1e-7)


def test_route_with_no_tokens():
    weights, ids = route(torch.zeros(0, 16, device=DEVICE), 4, False, True)
    assert weights.shape == ids.shape == (0, 4)


@pytest.mark.parametrize("dtype,gate_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("num_experts,hidden", [(60, 96), (128, 2048), (8, 1100)])
@pytest.mark.parametrize("name", sorted(ROUTINGS))
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_route_from_hidden_is_the_router_product_then_route(num_tokens, name, num_experts, hidden, dtype,
                                                            gate_dtype):
    """The one-launch router (its GEMV, then the last program of each token routes it) against its
    own parts: the logits it returns are the router's product (float32 for a float32 gate,
    DeepSeek's), and its choice is `route`'s of exactly those logits, weighed alike up to
    rounding; the counters are back at zero after each of several launches."""
    from tokenmill.ops.moe_routing import new_router_counter, route_from_hidden
    routing = ROUTINGS[name]
    if routing.top_k > num_experts:
        pytest.skip("more experts chosen than exist")
    g = torch.Generator().manual_seed(num_experts + hidden)
    weight = (torch.randn(num_experts, hidden, generator=g) / hidden ** 0.5).to(gate_dtype).to(DEVICE)
    logits_dtype = torch.promote_types(dtype, gate_dtype)
    bias = (torch.randn(num_experts, generator=g) * 0.2).to(DEVICE) if routing.correction_bias else None
    counter = new_router_counter(torch.device(DEVICE), num_tokens)
    for launch in range(3):
        x = (torch.randn(num_tokens, hidden, generator=g) * 2).to(dtype).to(DEVICE)
        weights, ids, logits = route_from_hidden(x, weight, routing.top_k, routing.scoring == "sigmoid",
                                                 routing.renormalize, routing.routed_scaling_factor, bias, counter)
        assert logits.dtype == logits_dtype and ids.dtype == torch.int32 and weights.dtype == torch.float32
        assert not counter.any()
        ref = (x.float() @ weight.float().T).to(logits_dtype)
        tol = 1e-5 if logits_dtype == torch.float32 else 1e-2
        torch.testing.assert_close(logits.float().cpu(), ref.float().cpu(), rtol=tol, atol=tol)
        ref_weights, ref_ids = route(logits, routing.top_k, routing.scoring == "sigmoid", routing.renormalize,
                                     routing.routed_scaling_factor, bias)
        assert torch.equal(ids.cpu(), ref_ids.cpu()), f"launch {launch}"
        # Two kernels may lay out (so sum) the softmax's denominator in different orders: float rounding.
        torch.testing.assert_close(weights.cpu(), ref_weights.cpu(), rtol=1e-6, atol=0, msg=f"launch {launch}")


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype,gate_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.float32)])
@pytest.mark.parametrize("num_experts,hidden", [(128, 2048), (60, 96 + 6)])
@pytest.mark.parametrize("name", ["qwen3-renorm", "minimax-m2"])
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_norm_fused_router_is_rms_norm_then_route_from_hidden(num_tokens, name, num_experts, hidden, dtype,
                                                              gate_dtype, with_residual):
    """`rms_norm_route_from_hidden` (a post-attention norm folded into the one-launch router)
    against its parts: `rms_norm`, then `route_from_hidden` of the normalised rows. The normalised
    rows it stores for the experts, the new residual and the routing are the same bits, over several
    launches on the same counters (also with dependent launches where the backend has them)."""
    from tokenmill.ops.moe_routing import new_router_counter, rms_norm_route_from_hidden, route_from_hidden
    from tokenmill.ops.pdl import supported
    from tokenmill.ops.rms_norm import rms_norm
    routing = ROUTINGS[name]
    g = torch.Generator().manual_seed(num_experts * hidden)
    weight = (torch.randn(num_experts, hidden, generator=g) / hidden ** 0.5).to(gate_dtype).to(DEVICE)
    norm_weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    bias = (torch.randn(num_experts, generator=g) * 0.2).to(DEVICE) if routing.correction_bias else None
    args = (routing.top_k, routing.scoring == "sigmoid", routing.renormalize, routing.routed_scaling_factor, bias)
    counter = new_router_counter(torch.device(DEVICE), num_tokens)
    for launch, pdl in enumerate([False, True, False] if supported(torch.device(DEVICE)) else [False] * 3):
        x = (torch.randn(num_tokens, hidden, generator=g) * 2).to(dtype).to(DEVICE)
        residual = (torch.randn(num_tokens, hidden, generator=g) * 3).to(dtype).to(DEVICE) if with_residual else None
        weights, ids, normed, new_residual = rms_norm_route_from_hidden(x, residual, norm_weight, 1e-6, weight,
                                                                        *args, counter, pdl=pdl)
        if with_residual:
            ref_normed, ref_residual = rms_norm(x, norm_weight, 1e-6, residual)
        else:
            ref_normed, ref_residual = rms_norm(x, norm_weight, 1e-6), x
        ref_weights, ref_ids, _ = route_from_hidden(ref_normed, weight, *args, counter)
        assert not counter.any()
        assert torch.equal(normed, ref_normed) and torch.equal(new_residual, ref_residual), f"launch {launch}"
        assert with_residual or new_residual is x
        assert torch.equal(ids, ref_ids) and torch.equal(weights, ref_weights), f"launch {launch}"


def test_router_launch_configuration_comes_from_its_gpus_table():
    """`route_from_hidden`'s launch configuration: this GPU's measured entry for the shape (and
    whether the norm is fused), else the default: two experts' rows a program from 64 experts, the
    K slice up to 1024, one warp up to 512 experts."""
    from tokenmill.ops import fused_moe_configs as configs
    assert configs.default_router_config(128, 2048) == configs.RouterConfig(2, 1024, 1)
    assert configs.default_router_config(8, 96) == configs.RouterConfig(1, 128, 1)
    assert configs.default_router_config(1024, 7168) == configs.RouterConfig(2, 1024, 4)
    for norm in (True, False):
        got = configs.router_config(128, 2048, torch.bfloat16, norm, DEVICE)
        table = configs.TUNED_ROUTER.get(torch.cuda.get_device_name(DEVICE), {}) if DEVICE.type == "cuda" else {}
        assert got == table.get((128, 2048, 2, norm), configs.default_router_config(128, 2048))
