"""Batch-invariant rollouts on the CPU (docs/rl.md): with `batch_invariant=True` a request's tokens,
greedy and seeded, are the same whether it runs alone or batched with others, under chunked
prefill, preemption and prefix-cache hits, in bfloat16 and over two tensor-parallel ranks; and the
model still matches HF transformers (float32 log-probabilities within tolerance)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineArgs

CONFIG = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6)
PROMPTS = [[(11 * i + 5 * j + 1) % 160 for i in range(9 + 13 * j)] for j in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request, tmp_path_factory):
    extra = {"llama": dict(architectures=["LlamaForCausalLM"], tie_word_embeddings=False),
             "qwen3": dict(architectures=["Qwen3ForCausalLM"], head_dim=32, tie_word_embeddings=True)}[request.param]
    config = AutoConfig.for_model(request.param, **CONFIG, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return str(folder), model


def _tokens(llm, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_logprobs_match_hf(tiny):
    folder, hf_model = tiny
    with LLM(folder, dtype="float32", block_size=4, batch_invariant=True, max_num_batched_tokens=8,
             kv_cache_memory=8 << 20) as llm:
        params = SamplingParams(temperature=0, max_tokens=6, logprobs=5, prompt_logprobs=5, ignore_eos=True)
        out = llm.generate([PROMPTS[3], PROMPTS[1]], params, use_tqdm=False)[0]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([PROMPTS[3] + generated])).logits[0].float(), dim=-1)
    assert generated == ref[len(PROMPTS[3]) - 1:-1].argmax(-1).tolist()
    for i in range(1, len(PROMPTS[3])):
        assert abs(out.prompt_logprobs[i][PROMPTS[3][i]].logprob - float(ref[i - 1, PROMPTS[3][i]])) < 2e-4


def test_tokens_do_not_depend_on_the_batch(tiny):
    folder, _ = tiny
    engine = dict(dtype="bfloat16", block_size=4, batch_invariant=True)
    with LLM(folder, kv_cache_memory=8 << 20, **engine) as llm:
        alone = [_tokens(llm, [p], GREEDY)[0] for p in PROMPTS]
        alone_seeded = [_tokens(llm, [p], SEEDED)[0] for p in PROMPTS[:2]]
        # Batched with each other and with copies; some prompts now hit the prefix cache.
        assert _tokens(llm, PROMPTS * 3, GREEDY) == alone * 3
        mixed = _tokens(llm, PROMPTS[:2] + PROMPTS, [SEEDED] * 2 + [GREEDY] * len(PROMPTS))
        assert mixed == alone_seeded + alone
    # Chunked prefill (8-token budget) and preemption (a 40-block pool), no prefix caching.
    with LLM(folder, max_num_batched_tokens=8, num_gpu_blocks_override=40, enable_prefix_caching=False,
             **engine) as llm:
        assert _tokens(llm, PROMPTS * 2, GREEDY) == alone * 2
        assert llm.engine.core.scheduler.num_preemptions > 0


@pytest.mark.slow
def test_tensor_parallel_tokens_do_not_depend_on_the_batch(tiny):
    folder, _ = tiny
    with LLM(folder, dtype="bfloat16", block_size=4, batch_invariant=True, tensor_parallel_size=2,
             kv_cache_memory=8 << 20) as llm:
        alone = [_tokens(llm, [p], GREEDY)[0] for p in PROMPTS]
        assert _tokens(llm, PROMPTS * 2, GREEDY) == alone * 2


def test_refused_combinations(tiny, tmp_path):
    """What batch-invariant mode has no invariant form of is refused at start, the reason named:
    mixture-of-experts, latent (MLA) and linear-attention models, sliding windows, quantised
    weights, the compiled CPU forward, more than two ranks, another attention backend."""
    folder, _ = tiny
    from transformers import DeepseekV3Config, MiniMaxConfig, MistralConfig, MixtralConfig, Qwen3MoeConfig

    small = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64)
    refused = {
        "MixtralForCausalLM": (MixtralConfig, {}, "form of its mixture-of-experts layers"),
        "Qwen3MoeForCausalLM": (Qwen3MoeConfig, dict(moe_intermediate_size=16), "form of its mixture-of-experts layers"),
        "DeepseekV3ForCausalLM": (DeepseekV3Config, dict(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                                         qk_rope_head_dim=8, v_head_dim=8), "latent attention \\(MLA\\)"),
        "MiniMaxForCausalLM": (MiniMaxConfig, dict(layer_types=["linear_attention", "full_attention"]),
                               "mixture-of-experts and linear-attention layers"),
        "MistralForCausalLM": (MistralConfig, dict(sliding_window=16), "sliding-window"),
    }
    for architecture, (config_class, extra, reason) in refused.items():
        path = tmp_path / architecture
        config_class(architectures=[architecture], **small, **extra).save_pretrained(path)
        with pytest.raises(ValueError, match=f"batch_invariant .*{reason}"):
            EngineArgs(model=str(path), load_format="dummy", batch_invariant=True).create_engine_config()
    for args, reason in [(dict(model=folder, quantization="fp8"), "quantization='fp8'"),
                         (dict(quantization="gguf"), "quantization='gguf'"),  # (the embedded GGUF)
                         (dict(model=folder, cpu_compile=True), "cpu_compile"),
                         (dict(model=folder, tensor_parallel_size=3), "tensor_parallel_size up to 2"),
                         (dict(model=folder, attention_backend="torch_native"), "cannot be combined")]:
        with pytest.raises(ValueError, match=reason):
            EngineArgs(batch_invariant=True, device="cpu", **args).create_engine_config()
    with pytest.raises(ValueError, match="set batch_invariant"):
        LLM(folder, attention_backend="batch_invariant")
