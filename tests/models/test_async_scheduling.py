"""Async scheduling (step N+1 scheduled and launched before step N's tokens are read) gives the
same results as synchronous steps, on the embedded model in float32.

On the CPU nothing actually overlaps, but every piece of the async path runs: in-flight token
accounting in the scheduler, inputs taken from the previous step's sampled-token tensor, requests
that stop or get preempted or aborted while their next step is already launched, and the fallback
to synchronous steps for penalties and grammars.
"""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams, StructuredOutputsParams

PREFIX = ("You are a careful assistant. Answer briefly and precisely, and never invent facts. "
          "The user asks about geography, arithmetic and programming. ")
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    PREFIX + "What is the capital of Italy?",
    PREFIX + "What is 7 times 8?",
    "List three colors:",
    "Les élèves du lycée ont étudié",
    PREFIX + "Write a Python function that reverses a string.",
    "1, 2, 3, 4,",
]


def _mixed_params() -> list[SamplingParams]:
    """One of each: greedy to EOS, length limits, stop ids and strings, seeded sampling with
    logprobs, n > 1, prompt logprobs, logit bias and min_tokens (all async), then penalties and a
    JSON schema (synchronous fallback)."""
    return [
        SamplingParams(temperature=0, max_tokens=40),
        SamplingParams(temperature=0, max_tokens=1),
        SamplingParams(temperature=0, max_tokens=24, stop=["\n"]),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_tokens=16, seed=11, logprobs=3),
        SamplingParams(temperature=1.0, min_p=0.05, max_tokens=12, n=3, seed=5),
        SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2, logit_bias={11: 5.0}),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=10, stop_token_ids=[198]),
        SamplingParams(temperature=0.7, max_tokens=16, seed=3, ignore_eos=True),
    ]


def _outputs(llm: LLM, params) -> list:
    return llm.generate(PROMPTS, params, use_tqdm=False)


def _summary(outputs) -> list:
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


def _assert_no_leaks(llm: LLM) -> None:
    core = llm.engine.core
    core.kv_manager.pool.check_invariants()
    assert all(b.ref_cnt == 0 for b in core.kv_manager.pool.blocks)
    assert not core.scheduler.requests and core._in_flight is None


def _logprobs_close(a, b, tol=1e-3) -> None:
    assert (a is None) == (b is None)
    if a is None:
        return
    assert len(a) == len(b)
    for pa, pb in zip(a, b):
        if pa is None:
            assert pb is None
            continue
        assert set(pa) == set(pb)
        for token in pa:
            assert abs(pa[token].logprob - pb[token].logprob) < tol
            assert pa[token].rank == pb[token].rank


@pytest.fixture(scope="module")
def engines():
    sync = LLM(dtype="float32", async_scheduling=False)
    async_ = LLM(dtype="float32", async_scheduling=True)
    yield sync, async_
    sync.shutdown()
    async_.shutdown()


def test_mixed_workload_same_as_synchronous(engines):
    sync, async_ = engines
    params = _mixed_params()
    expected, got = _outputs(sync, params), _outputs(async_, params)
    assert _summary(got) == _summary(expected)
    for e, g in zip(expected, got):
        _logprobs_close(e.prompt_logprobs, g.prompt_logprobs)
        for ce, cg in zip(e.outputs, g.outputs):
            _logprobs_close(ce.logprobs, cg.logprobs)
    _assert_no_leaks(async_)


def test_penalties_and_grammars_fall_back_to_synchronous_steps(engines):
    sync, async_ = engines
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    params = [SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3, presence_penalty=0.5,
                             frequency_penalty=0.3),
              SamplingParams(temperature=0, max_tokens=40, structured_outputs=StructuredOutputsParams(json=schema))]
    params += [SamplingParams(temperature=0, max_tokens=24)] * (len(PROMPTS) - len(params))
    expected, got = _outputs(sync, params), _outputs(async_, params)
    assert _summary(got) == _summary(expected)
    _assert_no_leaks(async_)


def test_preemption_and_prefix_hits_under_async(engines):
    """A KV pool too small for the batch: requests are preempted while their next step is already
    launched, and the shared prefix is served from the cache; tokens match synchronous steps."""
    sync, _ = engines
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    expected = _summary(_outputs(sync, params))
    tight = LLM(dtype="float32", async_scheduling=True, max_num_batched_tokens=16, block_size=4,
                num_gpu_blocks_override=40)
    try:
        assert _summary(_outputs(tight, params)) == expected
        assert tight.engine.core.scheduler.num_preemptions > 0
        assert tight.engine.core.kv_manager.prefix_hits > 0
        _assert_no_leaks(tight)
    finally:
        tight.shutdown()


def test_abort_while_next_step_is_in_flight(engines):
    _, async_ = engines
    engine = async_.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(f"abort-{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine.core._in_flight is not None  # a launched step whose tokens are unread
    engine.abort_request("abort-1")
    engine.abort_request("abort-3")
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["abort-0", "abort-2"]
    assert all(len(o.outputs[0].token_ids) == 50 for o in finished.values())
    _assert_no_leaks(async_)


def test_streamed_deltas_add_up_under_async(engines):
    """What the server streams (DELTA outputs, stop strings held back) is the same under async."""
    from tokenmill.sampling_params import RequestOutputKind

    sync, async_ = engines
    final = SamplingParams(temperature=0, max_tokens=30, stop=[" the"])
    finals = sync.generate(PROMPTS[:4], final, use_tqdm=False)
    assert any(o.outputs[0].stop_reason == " the" for o in finals)  # the held-back stop string matters
    expected = [o.outputs[0].text for o in finals]
    engine = async_.engine
    delta = final.clone(output_kind=RequestOutputKind.DELTA)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add_request(f"d{i}", prompt, delta)
    texts = {f"d{i}": "" for i in range(4)}
    while engine.has_unfinished_requests():
        for out in engine.step():
            texts[out.request_id] += out.outputs[0].text
    assert [texts[f"d{i}"] for i in range(4)] == expected
    _assert_no_leaks(async_)
