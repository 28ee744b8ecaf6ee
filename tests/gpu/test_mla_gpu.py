"""DeepSeek's multi-head latent attention on the GPU at its real widths (16 or 32 heads, rows of
512 + 64, heads of 128 + 64 / 128): the Triton MLA backend with CUDA graphs against HF
transformers, against the reference backend on the same GPU, and with an fp8 latent cache.
Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from gpu_models import (  # noqa: E402
    LOGIT_PARAMS, LOGIT_PROMPTS, assert_batch1_graphs_fuse_the_norms, assert_batch1_graphs_fuse_the_router,
    greedy_eager_and_graphs, logprob_errors)
from tokenmill import LLM, SamplingParams  # noqa: E402

WIDTHS = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
              num_hidden_layers=3, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
              max_position_embeddings=4096, first_k_dense_replace=1, n_routed_experts=8)
SHAPES = {
    # DeepSeek-V2-Lite's attention: 16 heads, no q_lora_rank, YaRN (mscale = mscale_all_dim), greedy routing.
    "v2-lite": dict(model_type="deepseek_v2", num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                    num_experts_per_tok=3, n_shared_experts=2, topk_method="greedy",
                    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                     "original_max_position_embeddings": 1024, "mscale": 0.707,
                                     "mscale_all_dim": 0.707}),
    # DeepSeek-V3's: q_lora_rank, YaRN with mscale_all_dim != mscale, grouped noaux_tc routing.
    "v3": dict(model_type="deepseek_v3", num_attention_heads=32, num_key_value_heads=32, q_lora_rank=256,
               num_experts_per_tok=2, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                "original_max_position_embeddings": 1024, "mscale": 1.0, "mscale_all_dim": 0.707}),
}


def mla_folder(tmp_path_factory, name: str, initializer_range: float, dtype=torch.bfloat16):
    values = dict(WIDTHS, **SHAPES[name])
    config = AutoConfig.for_model(values.pop("model_type"), initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    folder = tmp_path_factory.mktemp(f"{name}_{initializer_range}")
    model.save_pretrained(folder)
    return str(folder), model.to("cuda").eval()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_mla_logits_match_hf_bf16(name, tmp_path_factory):
    folder, hf = mla_folder(tmp_path_factory, name, 0.05)
    with LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, block_size=16) as llm:
        outs = llm.generate(LOGIT_PROMPTS, LOGIT_PARAMS, use_tqdm=False)
    # Routed experts (8): close on average; a position may be further off where bf16 rounding moved
    # a router score across the k-th one (as in test_moe_gpu).
    errors = logprob_errors(hf, LOGIT_PROMPTS, outs)
    assert sum(errors) / len(errors) < 1e-2 and max(errors) < 0.12, (name, sorted(errors)[-4:])


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_mla_cuda_graphs_match_eager(name, tmp_path_factory):
    folder, _ = mla_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    eager, graphs, graphs_async = greedy_eager_and_graphs(folder, dtype="bfloat16")
    assert eager == graphs == graphs_async


def test_mla_batch1_decode_graph_fuses_the_float32_router(tmp_path_factory, monkeypatch):
    """V2-Lite's routing (softmax, no expert groups) from its float32 gate, fused at batch 1."""
    folder, _ = mla_folder(tmp_path_factory, "v2-lite", 0.5)
    assert_batch1_graphs_fuse_the_router(folder, monkeypatch)


def test_mla_batch1_decode_graph_fuses_the_post_attention_norms(tmp_path_factory, monkeypatch):
    """V2-Lite's post-attention norms at batch 1: in the dense first layer's gate/up GEMV and in
    the MoE layers' fused router (float32 gate), with the greedy tokens of the unfused graphs."""
    folder, _ = mla_folder(tmp_path_factory, "v2-lite", 0.5)
    assert_batch1_graphs_fuse_the_norms(folder, monkeypatch, moe=True)


def test_triton_mla_matches_reference_backend_float32(tmp_path_factory):
    """The same float32 model through the Triton MLA backend (CUDA graphs) and the reference one,
    both on the GPU, with chunked prefill over cached prefixes, prefix-cache hits and preemption:
    the same greedy tokens, and logprobs to float32 rounding in another summation order (the
    kernels' float32 dots are IEEE: `ops/attention_common.model_dot`; as TF32 they moved tokens
    from the first one on, an H100, 2026-12-06)."""
    folder, _ = mla_folder(tmp_path_factory, "v3", 0.5, dtype=torch.float32)  # peaky: greedy margins wide
    shared = [(7 * i + 3) % 2048 for i in range(200)]
    prompts = [shared + [(5 * i + 11 * j) % 2048 for i in range(3 + 17 * j)] for j in range(6)]
    params = SamplingParams(temperature=0, max_tokens=32, logprobs=3, ignore_eos=True)
    results = []
    for backend in ("torch_native", "triton"):
        with LLM(folder, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, block_size=16,
                 attention_backend=backend, max_num_batched_tokens=128, num_gpu_blocks_override=34,
                 max_num_seqs=8) as llm:
            llm.generate(prompts[:1], params, use_tqdm=False)  # the shared prefix, cached
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert llm.engine.core.kv_manager.prefix_hits > 0
            assert llm.engine.core.scheduler.num_preemptions > 0
            graphs = llm.engine.core.executor.driver_worker.graphs
            assert (graphs is not None) == (backend == "triton")
            results.append(outs)
        torch.cuda.empty_cache()
    for ref, out in zip(*results):
        tokens = out.outputs[0].token_ids
        assert tokens == ref.outputs[0].token_ids
        for token, a, b in zip(tokens, out.outputs[0].logprobs, ref.outputs[0].logprobs):
            assert abs(a[token].logprob - b[token].logprob) < 5e-2


@pytest.mark.parametrize("features", ["plain", "eager", "chunked", "prefix", "preempt"])
def test_triton_mla_matches_reference_backend_one_feature_at_a_time(features, tmp_path_factory):
    """The float32 comparison above with one engine feature at a time, so a failure names the
    path: one-step prefills ("plain"), no CUDA graphs, chunked prefill over the request's own
    cached chunks, prefix-cache hits, preemption."""
    folder, _ = mla_folder(tmp_path_factory, "v3", 0.5, dtype=torch.float32)
    shared = [(7 * i + 3) % 2048 for i in range(200)]
    prompts = [shared + [(5 * i + 11 * j) % 2048 for i in range(3 + 17 * j)] for j in range(6)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    engine = dict(dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, block_size=16, max_num_seqs=8,
                  enable_prefix_caching=features == "prefix", enforce_eager=features == "eager")
    if features == "chunked":
        engine["max_num_batched_tokens"] = 128
    if features == "preempt":
        engine["num_gpu_blocks_override"] = 34
    results = []
    for backend in ("torch_native", "triton"):
        with LLM(folder, attention_backend=backend, **engine) as llm:
            if features == "prefix":
                llm.generate(prompts[:1], params, use_tqdm=False)
            results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
            if features == "preempt":
                assert llm.engine.core.scheduler.num_preemptions > 0
        torch.cuda.empty_cache()
    first_diff = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(*results)]
    assert results[0] == results[1], (features, first_diff)


def test_fp8_latent_cache_follows_fp8_rounded_hf(tmp_path_factory):
    """`kv_cache_dtype="fp8"` through the Triton path (fused rope + e4m3 write, chunked prefill
    expanding the cached prefix, decode from CUDA graphs): on its own greedy tokens, HF with its
    latents and rope keys rounded the same way is closer to the engine's log-probabilities than
    plain HF (as tests/models/test_mla_models.py checks on the CPU).

    Weights at 0.05, not the peaky 0.5 of the greedy tests: there any rounding difference is
    amplified, and the reference backend itself is 5.2 nats a token from rounded HF (a step's own
    latents stay exact in the engine's prefill, HF rounds them all). At 0.05 the reference
    backend gives 0.048 against rounded HF and 0.086 against plain HF (CPU, bf16, these prompts)."""
    from fp8_rounded_hf import fp8_rounded_deepseek

    folder, hf = mla_folder(tmp_path_factory, "v3", 0.05)
    prompts = [[(11 * i + 5 * j) % 2048 for i in range(n)] for j, n in enumerate((300, 40, 7))]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=1, ignore_eos=True)
    with LLM(folder, dtype="bfloat16", max_model_len=1024, kv_cache_dtype="fp8", max_num_batched_tokens=128,
             enable_prefix_caching=False, gpu_memory_utilization=0.3) as llm:
        assert llm.engine.core.executor.driver_worker.runner.kv_caches[0].dtype == torch.float8_e4m3fn
        outs = llm.generate(prompts, params, use_tqdm=False)

    def mean_gap() -> float:
        gaps = []
        with torch.no_grad():
            for prompt, out in zip(prompts, outs):
                generated = out.outputs[0].token_ids
                ref = torch.log_softmax(hf(torch.tensor([prompt + generated], device="cuda")).logits[0].float(), -1)
                gaps += [abs(out.outputs[0].logprobs[j][t].logprob - ref[len(prompt) - 1 + j, t].item())
                         for j, t in enumerate(generated)]
        assert len(gaps) == 72
        return sum(gaps) / len(gaps)

    plain = mean_gap()
    undo = fp8_rounded_deepseek(hf)
    try:
        rounded = mean_gap()
    finally:
        undo()
    # A cache read back wrong is nats off per token, and no closer to rounded HF than to plain.
    assert rounded < 0.15 and rounded < 0.8 * plain, (rounded, plain)
