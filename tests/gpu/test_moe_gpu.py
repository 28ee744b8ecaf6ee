"""Mixture-of-experts models on the GPU (the fused Triton MoE kernels, the Triton attention, CUDA
graphs) against HF transformers on the same random weights, and CUDA-graph replay against eager.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_models import (  # noqa: E402
    LOGIT_PARAMS, LOGIT_PROMPTS, assert_batch1_graphs_fuse_the_norms, assert_batch1_graphs_fuse_the_router,
    greedy_eager_and_graphs, logprob_errors)
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

COMMON = dict(vocab_size=2048, hidden_size=512, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
              head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False)
MOE_SHAPES = {
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=64,
                      num_experts_per_tok=8, moe_intermediate_size=192, intermediate_size=1024,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=32,
                      num_experts_per_tok=4, moe_intermediate_size=160, shared_expert_intermediate_size=640,
                      intermediate_size=1024),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=8,
                    num_experts_per_tok=2, intermediate_size=1024),
    "minimax_m2": dict(model_type="minimax_m2", architectures=["MiniMaxM2ForCausalLM"], rotary_dim=64,
                       num_local_experts=32, num_experts_per_tok=8, intermediate_size=256),
}


def moe_folder(tmp_path_factory, name: str, initializer_range: float, dtype=torch.bfloat16):
    values = {**COMMON, **MOE_SHAPES[name]}
    config = AutoConfig.for_model(values.pop("model_type"), initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return str(folder), model.to("cuda").eval()


@pytest.mark.parametrize("name", sorted(MOE_SHAPES))
def test_moe_logits_match_hf_bf16(name, tmp_path_factory):
    """bf16 against HF: on average as close as the dense models (2e-2 per position there); a
    position may be further off where rounding moved a router score across the k-th one and the
    two sides chose a different expert (on the CPU in bf16: mean 0.003, one position 0.027; Mixtral on
    an H200: mean 0.007, one position 0.073)."""
    folder, hf = moe_folder(tmp_path_factory, name, 0.05)
    with LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, block_size=16) as llm:
        outs = llm.generate(LOGIT_PROMPTS, LOGIT_PARAMS, use_tqdm=False)
    errors = logprob_errors(hf, LOGIT_PROMPTS, outs)
    assert sum(errors) / len(errors) < 1e-2 and max(errors) < 0.12, (name, sorted(errors)[-4:])


@pytest.mark.parametrize("name", ["qwen2_moe", "minimax_m2"])
def test_moe_float32_greedy_matches_hf(name, tmp_path_factory):
    """Float32 through the fused kernels (IEEE products, no TF32): HF's greedy tokens exactly."""
    folder, hf = moe_folder(tmp_path_factory, name, 0.2, dtype=torch.float32)
    prompts = [[(13 * i + 7 * j) % 2048 for i in range(n)] for j, n in enumerate((300, 40, 5))]
    params = SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True)
    with LLM(folder, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        generated = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + generated], device="cuda")).logits[0].float()
        assert generated == logits[len(prompt) - 1:-1].argmax(-1).tolist(), name


@pytest.mark.parametrize("name", ["qwen3_moe", "minimax_m2"])
def test_moe_cuda_graphs_match_eager(name, tmp_path_factory):
    folder, _ = moe_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    eager, graphs, graphs_async = greedy_eager_and_graphs(folder, dtype="bfloat16")
    assert eager == graphs == graphs_async



@pytest.mark.parametrize("name", ["qwen3_moe", "minimax_m2", "mixtral"])
def test_moe_batch1_decode_graph_fuses_the_router(name, tmp_path_factory, monkeypatch):
    folder, _ = moe_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    assert_batch1_graphs_fuse_the_router(folder, monkeypatch)


@pytest.mark.parametrize("name", ["qwen3_moe", "minimax_m2", "mixtral"])
def test_moe_batch1_decode_graph_fuses_the_norms(name, tmp_path_factory, monkeypatch):
    folder, _ = moe_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    assert_batch1_graphs_fuse_the_norms(folder, monkeypatch, moe=True)
