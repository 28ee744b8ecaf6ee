"""Tensor parallelism on the CPU (gloo): the embedded SmolLM2-135M split over 2 and 3 ranks gives
the same greedy tokens as one rank (float32), also under chunked prefill and preemption; sampling,
logprobs and structured output work through the driver; a dead rank fails the engine cleanly."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.executor.multiproc import MultiprocExecutor, WorkerDiedError

from test_hf_parity_embedded import MAX_TOKENS, PROMPTS

pytestmark = pytest.mark.slow

ENGINE = dict(dtype="float32", max_model_len=512, kv_cache_memory=64 << 20)
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def tp1_greedy(llm_fp32):
    return _greedy(llm_fp32)


def test_tp2_greedy_matches_tp1_and_extras_work(tp1_greedy, llm_fp32):
    # SmolLM2-135M has 9 query / 3 KV heads: over 2 ranks they split 6+3 / 2+1.
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, logprobs=3, prompt_logprobs=2)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    constrained = SamplingParams(temperature=0, max_tokens=20,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    expected_sampled = llm_fp32.generate(PROMPTS[:3], sampled, use_tqdm=False)
    with LLM(tensor_parallel_size=2, **ENGINE) as llm:
        executor = llm.engine.core.executor
        assert isinstance(executor, MultiprocExecutor)
        attn = executor.driver_worker.model.model.layers[0].self_attn.attn
        assert (attn.num_heads, attn.num_kv_heads) == (6, 2)  # rank 0's share
        assert _greedy(llm) == tp1_greedy
        # Seeded sampling, logprobs and prompt logprobs come from rank 0 as with one rank.
        got = llm.generate(PROMPTS[:3], sampled, use_tqdm=False)
        for ours, ref in zip(got, expected_sampled):
            assert ours.outputs[0].token_ids == ref.outputs[0].token_ids
            for a, b in zip(ours.outputs[0].logprobs, ref.outputs[0].logprobs):
                for token, lp in b.items():
                    assert abs(a[token].logprob - lp.logprob) < 1e-3
            assert len(ours.prompt_logprobs) == len(ref.prompt_logprobs)
        text = llm.generate(["Reply in JSON."], constrained, use_tqdm=False)[0].outputs[0].text
        assert text.startswith("{") and '"ok"' in text


def test_tp2_under_chunked_prefill_and_preemption(tp1_greedy):
    # An 8-token budget forces chunked prefill; a 24-block pool forces preemption.
    with LLM(tensor_parallel_size=2, dtype="float32", max_model_len=512, max_num_batched_tokens=8,
             num_gpu_blocks_override=24, block_size=4) as llm:
        assert _greedy(llm) == tp1_greedy
        assert llm.engine.core.kv_manager.pool.num_free_blocks == 24


def test_tp2_async_scheduling(tp1_greedy, llm_fp32):
    """Async scheduling over two ranks: rank 0 broadcasts each step's sampled tokens, the workers
    read their next inputs from them; under chunked prefill and preemption, and switching to
    synchronous steps (a grammar) and back, the tokens stay TP=1's."""
    sampled = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, logprobs=2)
    expected_sampled = [o.outputs[0].token_ids for o in llm_fp32.generate(PROMPTS[:4], sampled, use_tqdm=False)]
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    constrained = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(json=schema))
    with LLM(tensor_parallel_size=2, async_scheduling=True, dtype="float32", max_model_len=512,
             max_num_batched_tokens=8, num_gpu_blocks_override=24, block_size=4) as llm:
        assert _greedy(llm) == tp1_greedy
        assert llm.engine.core.scheduler.num_preemptions > 0
        got = llm.generate(PROMPTS[:4] + ["Reply in JSON."], [sampled] * 4 + [constrained], use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got[:4]] == expected_sampled
        assert got[4].outputs[0].text.startswith("{")
        assert llm.engine.core.kv_manager.pool.num_free_blocks == 24


def test_tp3_greedy_matches_tp1(tp1_greedy):
    with LLM(tensor_parallel_size=3, **ENGINE) as llm:
        attn = llm.engine.core.executor.driver_worker.model.model.layers[0].self_attn.attn
        assert (attn.num_heads, attn.num_kv_heads) == (3, 1)
        assert _greedy(llm) == tp1_greedy
        # No parallel state in globals: a single-rank engine runs beside it in the same process,
        # while a second tensor-parallel engine (one torch.distributed group per process) is refused.
        with LLM(**ENGINE) as single:
            assert _greedy(single) == tp1_greedy
        with pytest.raises(RuntimeError, match="shutdown"):
            LLM(tensor_parallel_size=2, **ENGINE)


def test_failed_start_up_leaves_no_tensor_parallel_state(monkeypatch):
    """An engine whose start-up fails after its ranks began (here rank 0's graph capture) stops
    them, so the next engine in the process can start."""
    from tokenmill.worker.model_runner import ModelRunner

    def broken(self):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(ModelRunner, "capture_cuda_graphs", broken)
    with pytest.raises(RuntimeError, match="capture failed"):
        LLM(tensor_parallel_size=2, **ENGINE)
    monkeypatch.undo()
    with LLM(tensor_parallel_size=2, **ENGINE) as llm:
        assert llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)[0].outputs[0].token_ids


def test_dead_rank_fails_the_engine_cleanly():
    llm = LLM(tensor_parallel_size=2, **ENGINE)
    try:
        executor = llm.engine.core.executor
        assert llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
        os.kill(executor._procs[0].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while executor.dead_reason is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "rank 1 exited" in executor.dead_reason
        with pytest.raises(WorkerDiedError, match="rank 1"):
            llm.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)
    finally:
        llm.shutdown()
    # The process group is gone: a new engine can start in this process.
    with LLM(**ENGINE) as again:
        assert again.generate("Hi", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids
