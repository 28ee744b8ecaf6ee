"""The offline LLM API on the embedded model: prompts of every shape, sampling options, stops,
n, logprobs, chat, validation and abort — with no KV block left behind."""

from __future__ import annotations

import pytest

from tokenmill import SamplingParams


def assert_no_leaks(llm):
    kv = llm.engine.core.kv_manager
    kv.pool.check_invariants()
    assert all(b.ref_cnt == 0 for b in kv.pool.blocks)
    assert not llm.engine.core.scheduler.requests


def test_prompt_shapes(llm_fp32):
    greedy = SamplingParams(temperature=0, max_tokens=5)
    by_text = llm_fp32.generate("The capital of France is", greedy, use_tqdm=False)
    ids = by_text[0].prompt_token_ids
    by_ids = llm_fp32.generate(ids, greedy, use_tqdm=False)
    by_dict = llm_fp32.generate([{"prompt_token_ids": ids}], greedy, use_tqdm=False)
    assert by_text[0].outputs[0].token_ids == by_ids[0].outputs[0].token_ids == by_dict[0].outputs[0].token_ids
    assert by_text[0].prompt == "The capital of France is"
    assert_no_leaks(llm_fp32)


def test_seed_reproducible_across_batches(llm_fp32):
    p = SamplingParams(temperature=1.0, max_tokens=12, seed=42)
    alone = llm_fp32.generate("Once upon a time", p, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=12)
    mixed = llm_fp32.generate(["Hi", "Once upon a time", "Hello world"], [others, p, others],
                              use_tqdm=False)[1].outputs[0].token_ids
    assert alone == mixed


def test_stop_string_is_not_leaked(llm_fp32):
    base = llm_fp32.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12),
                             use_tqdm=False)[0].outputs[0]
    assert "." in base.text
    out = llm_fp32.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=12, stop=["."]),
                            use_tqdm=False)[0].outputs[0]
    assert out.text == base.text[: base.text.index(".")]
    assert out.finish_reason == "stop" and out.stop_reason == "."
    kept = llm_fp32.generate("The capital of France is", SamplingParams(
        temperature=0, max_tokens=12, stop=["."], include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == out.text + "."
    assert_no_leaks(llm_fp32)


def test_stop_token_ids_and_max_tokens(llm_fp32):
    base = llm_fp32.generate("1, 2, 3,", SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    stop_id = base.token_ids[2]
    out = llm_fp32.generate("1, 2, 3,", SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]),
                            use_tqdm=False)[0].outputs[0]
    first = base.token_ids.index(stop_id)
    assert out.token_ids == base.token_ids[: first + 1] and out.stop_reason == stop_id


def test_n_samples_and_logprobs(llm_fp32):
    out = llm_fp32.generate("Tell me a story", SamplingParams(n=3, temperature=1.0, max_tokens=6, logprobs=2,
                                                              seed=7), use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        for token, position in zip(c.token_ids, c.logprobs):
            assert token in position and len(position) <= 3
            assert position[token].logprob <= 0
        assert abs(c.cumulative_logprob - sum(p[t].logprob for t, p in zip(c.token_ids, c.logprobs))) < 1e-4
    assert_no_leaks(llm_fp32)


def test_prompt_logprobs(llm_fp32):
    out = llm_fp32.generate("The capital of France is", SamplingParams(max_tokens=1, prompt_logprobs=1),
                            use_tqdm=False)[0]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for token, position in zip(out.prompt_token_ids[1:], out.prompt_logprobs[1:]):
        assert token in position


def test_chat_uses_template(llm_fp32):
    outs = llm_fp32.chat([[{"role": "user", "content": "What is 2+2?"}],
                          [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]],
                         SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)
    assert len(outs) == 2 and all(o.outputs[0].text for o in outs)
    tok = llm_fp32.get_tokenizer()
    assert outs[0].prompt_token_ids[:1] == tok.encode("<|im_start|>")


@pytest.mark.parametrize("prompt, fragment", [
    ("", "empty"),
    ([], "empty"),
    ([1, 2, 10**9], "token ids"),
    ([-1, 2], "token ids"),
])
def test_bad_prompts_raise_before_queueing(llm_fp32, prompt, fragment):
    with pytest.raises(ValueError, match=fragment):
        llm_fp32.generate(["fine prompt", prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert_no_leaks(llm_fp32)


def test_context_length_error_names_both_numbers():
    from tokenmill import LLM
    llm = LLM(dtype="float32", max_model_len=32, kv_cache_memory=1 << 24)
    with pytest.raises(ValueError, match="32 tokens.*requested"):
        llm.generate("a b c d e f", SamplingParams(max_tokens=30), use_tqdm=False)
    # The exact boundary is accepted.
    n = len(llm.get_tokenizer().encode("a b c d e f"))
    out = llm.generate("a b c d e f", SamplingParams(max_tokens=32 - n, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 32 - n


def test_abort_mid_generation_frees_blocks(llm_fp32):
    engine = llm_fp32.engine
    engine.add_request("abort-me", "Write a long essay about the sea.", SamplingParams(max_tokens=200))
    for _ in range(3):
        engine.step()
    engine.abort_request("abort-me")
    assert not engine.has_unfinished_requests()
    assert_no_leaks(llm_fp32)


def test_multibyte_text_streams_correctly(llm_fp32):
    from tokenmill.sampling_params import RequestOutputKind
    engine = llm_fp32.engine
    text = "日本語のテキスト 😀 café"
    ids = engine.tokenizer.encode(text)
    # Feed the ids as "generated" tokens through the detokenizer via a forced prompt continuation:
    from tokenmill.engine.detokenizer import IncrementalDetokenizer
    detok = IncrementalDetokenizer(engine.tokenizer, engine.tokenizer.encode("Say:"),
                                   SamplingParams(output_kind=RequestOutputKind.DELTA))
    for t in ids:
        detok.add_tokens([t])
    assert detok.text == engine.tokenizer.decode(ids)
    assert "\ufffd" not in detok.text
