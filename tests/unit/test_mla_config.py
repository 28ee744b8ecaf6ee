"""DeepSeek configuration handling: YaRN rotary tables and softmax scale exactly as HF computes
them, the interleaved rotary layout, config fields refused by name, the tensor-parallel split
check, the shipped shapes and the memory planner's refusal of models too large to load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig
from transformers.modeling_rope_utils import yarn_apply_mscale

from layer_context import layers_for
from tokenmill.config import EngineArgs
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.layers.rotary_embedding import (
    RotaryEmbedding,
    RotaryInputs,
    rope_parameters,
    rotate_interleaved,
    softmax_mscale,
)
from tokenmill.model.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from tokenmill.model.registry import weight_bytes_per_rank

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, q_lora_rank=None, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
            n_group=2, topk_group=1, max_position_embeddings=1024)
YARNS = [
    # DeepSeek-V3 (mscale = mscale_all_dim = 1), V2-Lite (0.707 both), a split pair (attention
    # factor != 1), Kimi-K2 (beta_fast = beta_slow), an explicit attention factor, no truncation.
    {"factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1},
    {"factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
    {"factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.707},
    {"factor": 32.0, "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 1.0, "beta_slow": 1.0},
    {"factor": 8.0, "attention_factor": 0.9},
    {"factor": 8.0, "truncate": False},
]


def deepseek_config(model_type: str = "deepseek_v3", **overrides):
    return AutoConfig.for_model(model_type, **{**TINY, **overrides})


@pytest.mark.parametrize("yarn", YARNS)
def test_yarn_table_and_softmax_scale_match_hf(yarn):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    config = deepseek_config(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0,
                                              "original_max_position_embeddings": 64, **yarn})
    hf = DeepseekV3RotaryEmbedding(config)
    positions = torch.arange(0, 1024, 7)
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), positions[None])
    theta, scaling = rope_parameters(config)
    with layers_for("cpu"):
        ours = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, theta, scaling)
    half = config.qk_rope_head_dim // 2
    table = ours.cos_sin_cache[positions]
    assert torch.equal(table[:, :half], cos[0, :, :half]) and torch.equal(table[:, half:], sin[0, :, :half])
    assert softmax_mscale(scaling) * 0.25 == yarn_apply_mscale(config.rope_parameters, 0.25)


def test_yarn_for_llama_family_matches_hf():
    """The same YaRN serves Qwen2 / Llama configs (HF's generic rotary), partial dims aside."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

    config = AutoConfig.for_model("qwen2", hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
                                  rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                                   "original_max_position_embeddings": 1024})
    cos, sin = Qwen2RotaryEmbedding(config)(torch.zeros(1), torch.arange(4096)[None])
    with layers_for("cpu"):
        ours = RotaryEmbedding(16, 4096, *rope_parameters(config))
    assert torch.equal(ours.cos_sin_cache, torch.cat([cos[0, :, :8], sin[0, :, :8]], dim=-1))
    assert softmax_mscale(rope_parameters(config)[1]) == 1.0  # (no mscale_all_dim: only DeepSeek scales)


def test_interleaved_rotation_gives_hf_attention_scores():
    """tokenmill keeps each rotated pair in place, HF's DeepSeek-V3 writes them de-interleaved:
    the same q.k products."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    with layers_for("cpu"):
        rotary = RotaryEmbedding(16, 128, 10000.0, None)
    positions = torch.tensor([0, 5, 77, 127])
    q, k = torch.randn(4, 3, 16), torch.randn(4, 1, 16)
    q_ours, k_ours = rotate_interleaved(q, k, RotaryInputs(positions, rotary.cos_sin_cache))
    cos, sin = rotary.cos_sin_cache[positions].chunk(2, dim=-1)
    emb = torch.cat([torch.cat([cos, cos], -1)[None], torch.cat([sin, sin], -1)[None]])  # [2, T, 16]
    q_hf, k_hf = apply_rotary_pos_emb_interleave(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb[0:1], emb[1:2])
    ours = torch.einsum("thd,sd->ths", q_ours, k_ours[:, 0])
    theirs = torch.einsum("htd,sd->ths", q_hf[0], k_hf[0, 0])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(q_ours, q_hf[0].transpose(0, 1))  # (the layouts do differ)


@pytest.mark.parametrize("cls,model_type,overrides,field", [
    (DeepseekV3ForCausalLM, "deepseek_v3", dict(moe_layer_freq=2), "moe_layer_freq"),
    (DeepseekV3ForCausalLM, "deepseek_v3", dict(scoring_func="softmax"), "scoring_func"),
    (DeepseekV3ForCausalLM, "deepseek_v3", dict(topk_method="greedy"), "topk_method"),
    (DeepseekV3ForCausalLM, "deepseek_v3", dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4,
                                                                 "factor": 2.0}), "dynamic"),
    (DeepseekV3ForCausalLM, "deepseek_v3", dict(hidden_act="gelu"), "gelu"),
    (DeepseekV2ForCausalLM, "deepseek_v2", dict(norm_topk_prob=True), "norm_topk_prob"),
    (DeepseekV2ForCausalLM, "deepseek_v2", dict(topk_method="noaux_tc"), "topk_method"),
    (DeepseekV2ForCausalLM, "deepseek_v2", dict(scoring_func="sigmoid"), "scoring_func"),
])
def test_unimplemented_fields_are_refused_by_name(cls, model_type, overrides, field):
    config = deepseek_config(model_type, **overrides)
    with layers_for("cpu"), pytest.raises(ValueError, match=field):
        cls(config)


def test_heads_must_split_evenly_under_tensor_parallelism(tmp_path):
    config = deepseek_config(architectures=["DeepseekV3ForCausalLM"])
    config.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by tensor_parallel_size \(3\)"):
        EngineArgs(model=str(tmp_path), load_format="dummy", tensor_parallel_size=3).create_engine_config()


# Published parameter counts (main model, bf16; DeepSeek-V3's multi-token-prediction layer is not loaded).
SHAPES = {"deepseek-v2-lite": 15.7e9, "moonlight-16b-a3b": 16.0e9, "deepseek-v3": 671.0e9, "kimi-k2": 1026.4e9}


@pytest.mark.parametrize("shape,params", sorted(SHAPES.items()))
def test_shipped_shapes_count_their_published_parameters(shape, params):
    config = EngineArgs(model=shape, load_format="dummy", dtype="bfloat16", device="cpu").create_engine_config()
    weights = weight_bytes_per_rank(config, TensorParallelGroup(0, 1, torch.device("cpu")))
    assert abs(weights / 2 - params) / params < 0.01, weights / 2
    # The heads and the experts' intermediate dimension split over 8 ranks; embeddings split too.
    per_rank = weight_bytes_per_rank(config, TensorParallelGroup(3, 8, torch.device("cpu")))
    assert weights / 8 < per_rank < weights / 6


def test_planner_refuses_a_model_too_large_for_the_host():
    """DeepSeek-V3's 1.3 TB of bf16 weights: a clear message at start, before anything loads."""
    with pytest.raises(ValueError, match=r"deepseek-v3 needs \d+\.\d GiB of weights per rank"):
        from tokenmill import LLM
        LLM("deepseek-v3", load_format="dummy", device="cpu", max_model_len=4096)


# Published activated parameters per token (DeepSeek-V2-Lite 2.4B, DeepSeek-V3 37B, Kimi-K2 32B).
ACTIVE = {"deepseek-v2-lite": 2.4e9, "deepseek-v3": 37e9, "kimi-k2": 32e9}


@pytest.mark.parametrize("shape,active", sorted(ACTIVE.items()))
def test_decode_floor_counts_the_activated_weights(shape, active):
    """The batch-1 floor's weight bytes (`benchmarks.common.weight_bytes_read`): attention, dense
    and shared weights, top-k of the routed experts, no embedding table."""
    from tokenmill.benchmarks.common import weight_bytes_read
    from tokenmill.model.registry import model_skeleton

    config = EngineArgs(model=shape, load_format="dummy", dtype="bfloat16", device="cpu").create_engine_config()
    model = model_skeleton(config, TensorParallelGroup(0, 1, torch.device("cpu")))
    weights = weight_bytes_read(model, 1)
    assert abs(weights / 2 - active) / active < 0.05, weights / 2
