"""Automatic prefix caching on the embedded model: same greedy tokens with the cache on and off
(also under chunked prefill and preemption), sharing across requests and `n` samples, salts."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams

DOC = ("The lighthouse stood on the northern cliff for two hundred years. Its keepers wrote every "
       "storm, every ship and every quiet night into a leather logbook that is now kept in the town "
       "museum. ") * 3
QUESTIONS = ["Who kept the logbook?", "Where is the logbook now?", "How old is the lighthouse?",
             "What did the keepers write?", "Where does the lighthouse stand?"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)


def _run(llm, prompts, params=GREEDY, **kw):
    return llm.generate(prompts, params, use_tqdm=False, **kw)


@pytest.fixture(scope="module")
def reference_tokens():
    llm = LLM(dtype="float32", enable_prefix_caching=False)
    return [o.outputs[0].token_ids for o in _run(llm, [DOC + q for q in QUESTIONS])]


@pytest.mark.parametrize("settings", [
    dict(),
    dict(max_num_batched_tokens=48, block_size=8),  # chunked prefill
    dict(block_size=4, num_gpu_blocks_override=46, max_num_batched_tokens=64),  # and preemption
])
def test_same_tokens_with_cache_on(reference_tokens, settings):
    llm = LLM(dtype="float32", enable_prefix_caching=True, **settings)
    prompts = [DOC + q for q in QUESTIONS]
    first = _run(llm, prompts)  # one batch: later requests hit blocks scheduled in the same step
    again = _run(llm, prompts[::-1])  # warm cache
    assert [o.outputs[0].token_ids for o in first] == reference_tokens
    assert [o.outputs[0].token_ids for o in again][::-1] == reference_tokens
    assert all(o.num_cached_tokens > 0 for o in again)
    kv = llm.engine.core.kv_manager
    assert kv.prefix_hits > 0
    if "num_gpu_blocks_override" in settings:
        assert llm.engine.core.scheduler.num_preemptions > 0
    kv.pool.check_invariants()
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)


def test_n_samples_share_prompt_blocks():
    llm = LLM(dtype="float32", enable_prefix_caching=True, block_size=8)
    out = _run(llm, DOC, SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=4))[0]
    assert len(out.outputs) == 4
    kv = llm.engine.core.kv_manager
    prompt_blocks = len(out.prompt_token_ids) // 8
    # Three of the four samples found the first sample's full prompt blocks.
    assert kv.prefix_hits == 3 * prompt_blocks * 8


def test_salts_partition_the_cache():
    llm = LLM(dtype="float32", enable_prefix_caching=True)
    _run(llm, [DOC + QUESTIONS[0]], cache_salt="tenant-a")
    same = _run(llm, [DOC + QUESTIONS[1]], cache_salt="tenant-a")[0]
    other = _run(llm, [DOC + QUESTIONS[1]], cache_salt="tenant-b")[0]
    unsalted = _run(llm, [DOC + QUESTIONS[2]])[0]
    assert same.num_cached_tokens > 0
    assert other.num_cached_tokens == 0 and unsalted.num_cached_tokens == 0


def test_prompt_logprobs_bypass_cache():
    llm = LLM(dtype="float32", enable_prefix_caching=True)
    _run(llm, [DOC + QUESTIONS[0]])
    out = _run(llm, [DOC + QUESTIONS[0]], SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    assert out.num_cached_tokens == 0
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
