"""Logits within tolerance of HF transformers for tiny random configs of every supported family.

Each model is created by transformers with random weights, saved as an HF folder (safetensors) and
loaded by tokenmill through its normal loader. Prompt log-probabilities (every prompt position,
through chunked prefill) and generated-token log-probabilities (paged decode) are compared.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, rms_norm_eps=1e-6)
CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                  rope_theta=500000.0),
    "llama-tied": dict(model_type="llama", architectures=["LlamaForCausalLM"], tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32,
                  tie_word_embeddings=True),
}
PROMPT = [(7 * i + 3) % 160 for i in range(37)]
NEW_TOKENS = 6


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_model(request, tmp_path_factory):
    values = dict(COMMON, **CONFIGS[request.param])
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, str(folder), model


@pytest.mark.parametrize("chunk", [None, 8])
def test_logprobs_match_hf(tiny_model, chunk):
    name, folder, hf_model = tiny_model
    kwargs = dict(dtype="float32", block_size=4, enable_prefix_caching=False)
    if chunk:
        kwargs["max_num_batched_tokens"] = chunk
    llm = LLM(folder, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, prompt_logprobs=5,
                            ignore_eos=True)
    # A second, shorter request in the same batch: decodes and prefills mix in one step.
    out, _ = llm.generate([PROMPT, PROMPT[:11]], params, use_tqdm=False)
    generated = out.outputs[0].token_ids
    full = torch.tensor([PROMPT + generated])
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(full).logits[0].float(), dim=-1)
    # Greedy tokens agree with HF's argmax at each generated position.
    assert generated == ref[len(PROMPT) - 1:-1].argmax(-1).tolist(), name
    # Prompt logprobs: position i holds log p(prompt[i] | prompt[:i]).
    assert out.prompt_logprobs[0] is None
    for i in range(1, len(PROMPT)):
        ours = out.prompt_logprobs[i][PROMPT[i]].logprob
        assert abs(ours - float(ref[i - 1, PROMPT[i]])) < 2e-4, (name, i)
    for j, position in enumerate(out.outputs[0].logprobs):
        row = ref[len(PROMPT) - 1 + j]
        top_ref = row.topk(5)
        for token_id, value in zip(top_ref.indices.tolist(), top_ref.values.tolist()):
            assert abs(position[token_id].logprob - value) < 2e-4, (name, j)
