"""The mixture-of-experts layer on the CPU: expert selection against HF transformers' own routers
(every routing form), the reference experts path against HF's experts modules (shared experts
included), tensor-parallel and expert-parallel shards summing to the whole, and the checkpoint
name mapping of the routed experts."""

from __future__ import annotations

import pytest
import torch
from transformers import (DeepseekV2Config, DeepseekV3Config, MiniMaxM2Config, MixtralConfig, Qwen2MoeConfig,
                          Qwen3MoeConfig)
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter

from layer_context import layers_for
from tokenmill.model.layers.mlp import GatedMLP
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.moe.router import RoutingConfig, select_experts
from tokenmill.model.loader.expert_weights import expert_weight

H, E, T = 32, 16, 40  # more tokens than experts, and (per expert) fewer: ragged loads


def _logits_of(router, hidden):
    """HF routers compute their logits from hidden states; ours takes the logits."""
    return torch.nn.functional.linear(hidden.float(), router.weight.float())


def _assert_same_choice(ours, ref_weights, ref_ids):
    weights, ids = ours
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    order, ref_order = ids.long().sort(dim=-1), ref_ids.long().sort(dim=-1)
    assert torch.equal(order.values, ref_order.values)  # the same experts, every token
    torch.testing.assert_close(weights.gather(1, order.indices), ref_weights.float().gather(1, ref_order.indices),
                               rtol=1e-6, atol=1e-7)


def _routers():
    common = dict(hidden_size=H, num_hidden_layers=1, num_attention_heads=4)
    yield "mixtral", MixtralTopKRouter(MixtralConfig(num_local_experts=E, num_experts_per_tok=2, **common)), \
        RoutingConfig(top_k=2, renormalize=True), False
    for norm in (False, True):
        cfg = Qwen3MoeConfig(num_experts=E, num_experts_per_tok=4, norm_topk_prob=norm, **common)
        yield f"qwen3-norm{norm}", Qwen3MoeTopKRouter(cfg), RoutingConfig(top_k=4, renormalize=norm), False
    v3 = DeepseekV3Config(n_routed_experts=E, num_experts_per_tok=4, n_group=4, topk_group=2,
                          routed_scaling_factor=2.5, norm_topk_prob=True, **common)
    yield "deepseek-v3", DeepseekV3TopkRouter(v3), RoutingConfig(
        top_k=4, scoring="sigmoid", renormalize=True, num_expert_groups=4, topk_groups=2,
        routed_scaling_factor=2.5, correction_bias=True), True
    for method in ("greedy", "group_limited_greedy"):
        v2 = DeepseekV2Config(n_routed_experts=E, num_experts_per_tok=3, n_group=4, topk_group=2,
                              topk_method=method, routed_scaling_factor=1.5, **common)
        groups = dict(num_expert_groups=4, topk_groups=2) if method != "greedy" else {}
        yield f"deepseek-v2-{method}", DeepseekV2TopkRouter(v2), RoutingConfig(
            top_k=3, routed_scaling_factor=1.5, **groups), False
    m2 = MiniMaxM2Config(num_local_experts=E, num_experts_per_tok=4, **common)
    yield "minimax-m2", MiniMaxM2TopKRouter(m2), RoutingConfig(
        top_k=4, scoring="sigmoid", renormalize=True, correction_bias=True), True


@pytest.mark.parametrize("case", list(_routers()), ids=lambda c: c[0])
def test_select_experts_matches_hf_routers(case):
    _, router, routing, has_bias = case
    torch.manual_seed(0)
    router.weight.data.normal_(0, 0.5)
    hidden = torch.randn(T, H)
    bias = None
    if has_bias:
        # Large enough to change the choice: the bias must pick, the unbiased scores weigh.
        bias = torch.randn(E) * 0.3
    if isinstance(router, MiniMaxM2TopKRouter):
        _, ref_weights, ref_ids = router(hidden, bias)
    else:
        if has_bias:
            router.e_score_correction_bias.copy_(bias)
        _, ref_weights, ref_ids = router(hidden)
    _assert_same_choice(select_experts(_logits_of(router, hidden), routing, bias), ref_weights, ref_ids)
    if has_bias:  # the bias really changed the choice somewhere (else the test proves little)
        unbiased = RoutingConfig(**{**routing.__dict__, "correction_bias": False})
        plain = select_experts(_logits_of(router, hidden), unbiased)
        assert not torch.equal(plain[1].sort().values, ref_ids.int().sort().values)


def test_routing_config_refuses_impossible_routings():
    with pytest.raises(ValueError, match="scoring"):
        RoutingConfig(top_k=2, scoring="sparsemax")
    with pytest.raises(ValueError, match="both"):
        RoutingConfig(top_k=2, num_expert_groups=4)
    with pytest.raises(ValueError, match="exceeds"):
        RoutingConfig(top_k=8, num_expert_groups=8, topk_groups=1).check_num_experts(16)
    with pytest.raises(ValueError, match="correction_bias"):
        select_experts(torch.zeros(2, 4), RoutingConfig(top_k=1, scoring="sigmoid", correction_bias=True))


def _load_from_hf_experts(layer: FusedMoE, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Feed the layer HF's stacked experts one checkpoint matrix at a time, as a checkpoint would."""
    inter = down.shape[-1]
    for e in range(gate_up.shape[0]):
        layer.weight_loader(layer.w13_weight, gate_up[e, :inter], "w1", e)
        layer.weight_loader(layer.w13_weight, gate_up[e, inter:], "w3", e)
        layer.weight_loader(layer.w2_weight, down[e], "w2", e)
    assert layer.unloaded_weights() == []


def _load_mlp(mlp: GatedMLP, hf_mlp) -> None:
    mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, hf_mlp.gate_proj.weight.data, 0)
    mlp.gate_up_proj.weight_loader(mlp.gate_up_proj.weight, hf_mlp.up_proj.weight.data, 1)
    mlp.down_proj.weight_loader(mlp.down_proj.weight, hf_mlp.down_proj.weight.data)


def _build(rank, world, routing, inter, shared_inter=None, shared_gate=None, local_experts=None, hf_block=None):
    """A FusedMoE (and its shared expert) for one rank, loaded from `hf_block`; its sum over ranks
    is taken by the test (no process group here)."""
    with layers_for("cpu", rank, world) as ctx:
        shared = GatedMLP(H, shared_inter, reduce_results=False) if shared_inter else None
        gate = None
        if shared_gate is not None:
            from tokenmill.model.layers.linear import ReplicatedLinear
            gate = ReplicatedLinear(H, 1, bias=False)
            gate.weight.data.copy_(shared_gate)
        layer = FusedMoE(E, H, inter, routing, shared_experts=shared, shared_expert_gate=gate,
                         local_experts=local_experts)
    ctx.tp.defer_sum = lambda x, pushed=False: x  # this rank's partial sum, summed by the test
    _load_from_hf_experts(layer, hf_block.experts.gate_up_proj.data, hf_block.experts.down_proj.data)
    if shared is not None:
        _load_mlp(shared, hf_block.shared_expert)
    return layer, (shared, gate)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("norm", [False, True])
def test_reference_experts_match_hf_qwen3_moe_block(world, norm):
    cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=4, moe_intermediate_size=24,
                         norm_topk_prob=norm, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(1)
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    hidden = torch.randn(1, T, H)
    with torch.no_grad():
        ref = block(hidden)[0]
        logits = _logits_of(block.gate, hidden[0])
        routing = RoutingConfig(top_k=4, renormalize=norm)
        out = sum(_build(r, world, routing, 24, hf_block=block)[0](hidden[0], logits) for r in range(world))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_reference_experts_with_gated_shared_expert_match_hf_qwen2_moe_block(world):
    cfg = Qwen2MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=4, moe_intermediate_size=24,
                         shared_expert_intermediate_size=40, num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(2)
    block = Qwen2MoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    hidden = torch.randn(1, T, H)
    with torch.no_grad():
        ref = block(hidden)[0]
        logits = _logits_of(block.gate, hidden[0])
        routing = RoutingConfig(top_k=4)
        out = sum(_build(r, world, routing, 24, shared_inter=40, shared_gate=block.shared_expert_gate.weight.data,
                         hf_block=block)[0](hidden[0], logits) for r in range(world))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_expert_parallel_shards_sum_to_the_whole_layer():
    """Ranks holding disjoint experts (`local_experts`) each compute only their experts' share;
    the shares add up to the single-rank layer, and unused experts are never touched."""
    cfg = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=4, moe_intermediate_size=24,
                         num_hidden_layers=1, num_attention_heads=4)
    torch.manual_seed(3)
    block = Qwen3MoeSparseMoeBlock(cfg).eval()
    for p in block.parameters():
        p.data.normal_(0, 0.3)
    hidden = torch.randn(T, H)
    routing = RoutingConfig(top_k=4)
    with torch.no_grad():
        logits = _logits_of(block.gate, hidden)
        whole, _ = _build(0, 1, routing, 24, hf_block=block)
        even, _ = _build(0, 1, routing, 24, local_experts=range(0, E, 2), hf_block=block)
        odd, _ = _build(0, 1, routing, 24, local_experts=range(1, E, 2), hf_block=block)
        assert even.w13_weight.shape[0] == E // 2 and even.expert_map[1] == -1 and even.expert_map[2] == 1
        torch.testing.assert_close(even(hidden, logits) + odd(hidden, logits), whole(hidden, logits))
        # An expert no token chose is never read: poisoning its weights changes nothing.
        used = set(select_experts(logits[:3], routing)[1].flatten().tolist())
        unused = next(e for e in range(E) if e not in used)
        before = whole(hidden[:3], logits[:3])
        whole.w13_weight.data[unused].fill_(float("nan"))
        torch.testing.assert_close(whole(hidden[:3], logits[:3]), before)


def test_weight_loader_refuses_wrong_shapes_and_reports_missing_experts():
    with layers_for("cpu", 0, 2):
        layer = FusedMoE(E, H, 24, RoutingConfig(top_k=2))
    assert layer.w13_weight.shape == (E, 24, H) and layer.w2_weight.shape == (E, H, 12)
    with pytest.raises(ValueError, match="expected"):
        layer.weight_loader(layer.w13_weight, torch.zeros(12, H), "w1", 0)  # a pre-sharded tensor
    layer.weight_loader(layer.w13_weight, torch.zeros(24, H), "w1", 0)
    missing = layer.unloaded_weights()
    assert "expert 0 w3" in missing and "expert 0 w1" not in missing and len(missing) == 3 * E - 1


def test_expert_checkpoint_names_map_to_stacked_parameters():
    assert expert_weight("model.layers.3.mlp.experts.17.gate_proj.weight") == (
        "model.layers.3.mlp.experts.w13_weight", "w1", 17)
    assert expert_weight("model.layers.0.mlp.experts.2.up_proj.weight").shard_id == "w3"
    assert expert_weight("model.layers.0.mlp.experts.2.down_proj.weight").param_name.endswith("experts.w2_weight")
    assert expert_weight("model.layers.1.block_sparse_moe.experts.7.w3.weight") == (
        "model.layers.1.block_sparse_moe.experts.w13_weight", "w3", 7)
    assert expert_weight("model.layers.1.block_sparse_moe.experts.7.w2.weight").shard_id == "w2"
    # Shared experts and dense MLPs are plain merged layers, not routed experts.
    assert expert_weight("model.layers.0.mlp.shared_experts.gate_proj.weight") is None
    assert expert_weight("model.layers.0.mlp.shared_expert.up_proj.weight") is None
    assert expert_weight("model.layers.0.mlp.gate_proj.weight") is None
