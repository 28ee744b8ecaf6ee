"""The official `openai` SDK against a real `tokenmill serve` on the embedded model."""

from __future__ import annotations

import openai
import pytest

from conftest import MAX_MODEL_LEN

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_models_list(openai_client, model_name):
    models = openai_client.models.list().data
    assert [m.id for m in models] == [model_name]


def test_chat_greedy_non_stream(openai_client, model_name):
    resp = openai_client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=12,
                                                 temperature=0)
    choice = resp.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_chat_stream_matches_non_stream(openai_client, model_name):
    full = openai_client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=12,
                                                 temperature=0)
    stream = openai_client.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=12,
                                                   temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_n_logprobs_and_seed(openai_client, model_name):
    kwargs = dict(model=model_name, messages=QUESTION, max_tokens=6, temperature=1.0, n=2, seed=1234,
                  logprobs=True, top_logprobs=2)
    a = openai_client.chat.completions.create(**kwargs)
    b = openai_client.chat.completions.create(**kwargs)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    for choice in a.choices:
        content = choice.logprobs.content
        assert content and len(content) <= 6
        assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_completions_stop_string_and_echo(openai_client, model_name):
    resp = openai_client.completions.create(model=model_name, prompt="1, 2, 3, 4,", max_tokens=20,
                                            temperature=0, stop=[" 7"], echo=True)
    text = resp.choices[0].text
    assert text.startswith("1, 2, 3, 4,")
    assert " 7" not in text and resp.choices[0].finish_reason == "stop"


def test_completions_stream_with_logprobs(openai_client, model_name):
    stream = openai_client.completions.create(model=model_name, prompt="The capital of France is",
                                              max_tokens=5, temperature=0, stream=True, logprobs=1)
    chunks = list(stream)
    assert sum(len(c.choices[0].logprobs.tokens) for c in chunks) == 5
    assert chunks[-1].choices[0].finish_reason == "length"


def test_context_length_error(openai_client, model_name):
    prompt = "hello " * 490  # close to the limit, so the boundary request is short
    prompt_tokens = openai_client.completions.create(model=model_name, prompt=prompt,
                                                     max_tokens=1).usage.prompt_tokens
    assert prompt_tokens < MAX_MODEL_LEN - 1
    ok = openai_client.completions.create(model=model_name, prompt=prompt, temperature=0,
                                          max_tokens=MAX_MODEL_LEN - prompt_tokens)
    assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.completions.create(model=model_name, prompt=prompt, stream=True,
                                         max_tokens=MAX_MODEL_LEN - prompt_tokens + 1)
    assert info.value.code == "context_length_exceeded"
    assert str(MAX_MODEL_LEN) in info.value.message


def test_sdk_errors(server, model_name):
    bad_key = openai.OpenAI(api_key="wrong", base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    good = openai.OpenAI(api_key=server.api_key, base_url=f"{server.url}/v1", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        good.chat.completions.create(model="no-such-model", messages=QUESTION, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        good.chat.completions.create(model=model_name, messages=QUESTION, max_tokens=2, temperature=-1)


def test_completions_several_prompts_and_n(openai_client, model_name):
    prompts = ["The sky is", "Water is"]
    full = openai_client.completions.create(model=model_name, prompt=prompts, n=2, max_tokens=4,
                                            temperature=0)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    # Greedy samples of one prompt agree; the two prompts answer separately.
    assert full.choices[0].text == full.choices[1].text and full.choices[2].text == full.choices[3].text
    stream = openai_client.completions.create(model=model_name, prompt=prompts, n=2, max_tokens=4,
                                              temperature=0, stream=True)
    texts: dict[int, str] = {}
    finished = set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1, 2, 3}
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
