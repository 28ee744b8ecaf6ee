"""Exact greedy tokens against HF transformers `generate()` on the embedded SmolLM2-135M (float32).

Prompts go to tokenmill together, in one `generate` call, and again under settings that force
chunked prefill and preemption: batching must not change any result.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Hello, my name is",
    "List three colors:",
    "Translate to French: I love reading books.",
    "1, 2, 3, 4,",
    "In a hole in the ground there lived a",
    "The quick brown fox",
    "Q: What is 12 times 12?\nA:",
    "Write a haiku about the sea.",
    "Les élèves du lycée ont étudié",  # multi-byte characters
    "import numpy as np\nx = np.",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hf_greedy(hf_reference):
    model, tokenizer = hf_reference
    results = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=MAX_TOKENS,
                                 attention_mask=torch.ones_like(ids))
        results.append(out[0, ids.shape[1]:].tolist())
    return results


def _greedy_tokens(llm: LLM) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def test_greedy_matches_hf_batched(llm_fp32, hf_greedy):
    assert _greedy_tokens(llm_fp32) == hf_greedy


def test_greedy_matches_hf_with_chunked_prefill_and_preemption(hf_greedy):
    # 8-token budget chunks every prompt; 24 blocks of 4 tokens cannot hold 12 sequences of ~35
    # tokens, so requests are preempted and recomputed.
    llm = LLM(dtype="float32", max_num_batched_tokens=8, block_size=4, num_gpu_blocks_override=24,
              enable_prefix_caching=False)
    assert _greedy_tokens(llm) == hf_greedy
    assert llm.engine.core.scheduler.num_preemptions > 0
    kv = llm.engine.core.kv_manager
    assert kv.pool.num_free_blocks == kv.pool.num_blocks
    kv.pool.check_invariants()


def test_text_matches_hf_decode(llm_fp32, hf_reference, hf_greedy):
    _, tokenizer = hf_reference
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
    outputs = llm_fp32.generate(PROMPTS, params, use_tqdm=False)
    for out, ref in zip(outputs, hf_greedy):
        assert out.outputs[0].text == tokenizer.decode(ref, skip_special_tokens=True)
