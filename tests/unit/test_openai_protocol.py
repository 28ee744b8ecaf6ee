"""Pure validation of the OpenAI and Anthropic request models and their SamplingParams (no server)."""

from __future__ import annotations

import math

import pydantic
import pytest

from tokenmill.entrypoints.anthropic.protocol import MessagesRequest
from tokenmill.entrypoints.openai.protocol import (
    MAX_PROMPTS_PER_REQUEST, ChatCompletionRequest, CompletionRequest, TokenizeRequest,
)
from tokenmill.entrypoints.server.errors import MAX_MESSAGE_CHARS, validation_message
from tokenmill.sampling_params import RequestOutputKind

USER = [{"role": "user", "content": "hi"}]


def chat(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": USER, **kw})


def params_of(req, **kw):
    logprobs = req.num_logprobs() if isinstance(req, ChatCompletionRequest) else req.logprobs
    return req.to_sampling_params(default_max_tokens=None, logprobs=logprobs, **kw)


def test_chat_maps_every_sampling_field():
    req = chat(max_completion_tokens=7, max_tokens=99, temperature=0.5, top_p=0.9, top_k=5, min_p=0.1,
               seed=3, stop="END", presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2,
               logit_bias={"12": 5}, min_tokens=2, ignore_eos=True, stop_token_ids=[4],
               logprobs=True, top_logprobs=3, stream=True)
    p = params_of(req)
    assert p.max_tokens == 7  # max_completion_tokens wins over the deprecated max_tokens
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.5, 0.9, 5, 0.1, 3)
    assert p.stop == ["END"] and p.stop_token_ids == [4]
    assert p.logit_bias == {12: 5.0}
    assert p.logprobs == 3 and p.min_tokens == 2 and p.ignore_eos
    assert p.output_kind == RequestOutputKind.DELTA
    assert params_of(chat()).output_kind == RequestOutputKind.FINAL_ONLY


@pytest.mark.parametrize("messages", [None, "hello", [], [{"content": "x"}], [{"role": "user"}],
                                      [{"role": "wizard", "content": "x"}],
                                      [{"role": "user", "content": [{"type": "image_url"}]}]])
def test_bad_messages_rejected(messages):
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({"messages": messages})


@pytest.mark.parametrize("fields", [
    {"stream_options": {"include_usage": True}},  # without stream
    {"top_logprobs": 21, "logprobs": True},
    {"top_logprobs": 2},  # without logprobs
    {"logit_bias": {"abc": 1}},
    {"logit_bias": {"5": 1000}},
    {"stop": ["x"] * 17},
])
def test_chat_field_errors(fields):
    with pytest.raises(pydantic.ValidationError):
        chat(**fields)


@pytest.mark.parametrize("fields", [
    {"max_tokens": 0}, {"n": 0}, {"n": 10**6}, {"temperature": -1}, {"temperature": math.nan},
    {"top_p": 0}, {"top_p": math.inf}, {"min_p": 2}, {"presence_penalty": 3},
    {"repetition_penalty": 0}, {"seed": 2**64}, {"min_tokens": 5, "max_tokens": 2},
    {"top_k": -5}, {"n": 128, "max_tokens": 10**5},
])
def test_sampling_range_errors_are_value_errors(fields):
    # Caught by the model's types where it can say so, else by SamplingParams: a 400 either way.
    with pytest.raises(ValueError):
        params_of(chat(**fields))


def test_logit_bias_error_names_the_bad_keys():
    with pytest.raises(pydantic.ValidationError) as info:
        chat(logit_bias={"1": 1, "bad-key": 2, "3": "x"})
    assert "bad-key" in validation_message(info.value) or "3" in validation_message(info.value)


def test_completion_prompt_shapes():
    assert CompletionRequest.model_validate({"prompt": "a"}).prompts() == ["a"]
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompts() == [[1, 2]]
    assert CompletionRequest.model_validate({"prompt": ["a", "b"]}).prompts() == ["a", "b"]
    assert CompletionRequest.model_validate({"prompt": [[1], [2]]}).prompts() == [[1], [2]]


@pytest.mark.parametrize("prompt", [[], ["a"] * (MAX_PROMPTS_PER_REQUEST + 1), None, {"a": 1}])
def test_completion_prompt_errors(prompt):
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"prompt": prompt})


def test_completion_logprobs_bounds():
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"prompt": "a", "logprobs": -1})
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"prompt": "a", "logprobs": 21})
    req = CompletionRequest.model_validate({"prompt": "a", "logprobs": 2, "echo": True})
    assert params_of(req, prompt_logprobs=2).prompt_logprobs == 2


def test_validation_message_is_bounded_and_does_not_echo_input():
    huge = [{"role": "nobody", "content": "SECRET" * 1000}] * 3000
    with pytest.raises(pydantic.ValidationError) as info:
        ChatCompletionRequest.model_validate({"messages": huge})
    message = validation_message(info.value)
    assert len(message) <= MAX_MESSAGE_CHARS + 20
    assert "SECRET" not in message
    assert "more errors" in message


def test_tokenize_needs_exactly_one_input():
    with pytest.raises(pydantic.ValidationError):
        TokenizeRequest.model_validate({})
    with pytest.raises(pydantic.ValidationError):
        TokenizeRequest.model_validate({"prompt": "a", "messages": USER})


def test_anthropic_messages():
    req = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "system": [{"type": "text", "text": "sys"}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                     {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
        "stop_sequences": ["x"], "temperature": 0.2, "top_k": 3,
    })
    assert req.chat_messages() == [{"role": "system", "content": "sys"}, {"role": "user", "content": "ab"},
                                   {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}]
    p = req.to_sampling_params()
    assert (p.max_tokens, p.stop, p.temperature, p.top_k) == (5, ["x"], 0.2, 3)


@pytest.mark.parametrize("body", [
    {"model": "m", "messages": USER},  # max_tokens missing
    {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
    {"model": "m", "max_tokens": 5, "messages": USER, "temperature": 1.5},
    {"max_tokens": 5, "messages": USER},  # model missing
])
def test_anthropic_errors(body):
    with pytest.raises(pydantic.ValidationError):
        MessagesRequest.model_validate(body)


def test_response_format_and_structured_outputs():
    p = params_of(chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}))
    assert p.structured_outputs.json == {"type": "object"}
    assert params_of(chat(response_format={"type": "text"})).structured_outputs is None
    assert params_of(chat(structured_outputs={"choice": ["a", "b"]})).structured_outputs.choice == ["a", "b"]
    for bad in ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
                {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
                {"structured_outputs": {"regexp": "a"}},
                {"structured_outputs": {"regex": "a", "choice": ["b"]}},
                {"structured_outputs": {"choice": "abc"}},
                {"structured_outputs": {"json_object": "yes"}},
                {"structured_outputs": {"regex": 5}},
                {"structured_outputs": {"grammar": 7}}):
        with pytest.raises(ValueError):
            params_of(chat(**bad))
    with pytest.raises(pydantic.ValidationError):
        chat(response_format={"type": "yaml"})


def test_anthropic_tool_blocks_become_template_messages():
    req = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5, "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": "hi"},
                     {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}}]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "42"}]}]})
    assert req.chat_messages()[1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert req.chat_messages()[2] == {"role": "tool", "tool_call_id": "t1", "content": "42"}
    assert req.template_tools()[0]["function"]["name"] == "f"
    with pytest.raises(pydantic.ValidationError):  # a tool_use block without its id
        MessagesRequest.model_validate({"model": "m", "max_tokens": 5, "messages": [
            {"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]})


@pytest.mark.parametrize("fields", [
    {"max_tokens": "10"}, {"max_tokens": True}, {"max_tokens": 1.0}, {"logprobs": "yes"}, {"logprobs": 1},
    {"stream": "yes"}, {"stream": 0}, {"n": "2"}, {"temperature": "0.5"}, {"temperature": 2.5},
    {"seed": 2**63}, {"priority": 10**20}, {"priority": -10**20}, {"top_k": 10**20},
    {"stop_token_ids": [10**20]}, {"stop_token_ids": [-1]}, {"logit_bias": {"²": 1}}, {"logit_bias": {"-1": 1}},
    {"structured_outputs": {"choice": "abc"}}, {"structured_outputs": {"json_object": "yes"}},
    {"structured_outputs": {"regex": 5}}, {"structured_outputs": {"grammar": 7}},
    {"chat_template": "{{ 7 * 7 }}"}, {"chat_template_kwargs": {"chat_template": "x"}},
    {"chat_template_kwargs": {"tokenize": True}}, {"chat_template_kwargs": {"tokenizer_kwargs": {}}},
    {"tool_choice": {"type": "function", "function": [1]}}, {"tools": [{}]}, {"timeout": 0},
])
def test_mistyped_or_out_of_range_fields_are_rejected(fields):
    """As OpenAI does: no coercion of strings or booleans, every integer within 64 bits."""
    with pytest.raises(ValueError):
        params_of(chat(**fields))


@pytest.mark.parametrize("prompt", [[True], ["a", 1], [[1], []], 5, [1.0]])
def test_completion_prompt_types_are_strict(prompt):
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"prompt": prompt})


def test_edge_values_are_accepted():
    p = params_of(chat(seed=2**63 - 1, n=2, priority=-(2**63), temperature=2, top_k=-1, timeout=0.5))
    assert p.seed == 2**63 - 1 and p.n == 2 and p.temperature == 2
    p = params_of(chat(chat_template_kwargs={"enable_thinking": False}, logit_bias={"0": 100}))
    assert p.logit_bias == {0: 100.0}


def test_anthropic_types_are_strict():
    base = {"model": "m", "max_tokens": 5, "messages": USER}
    for bad in ({"max_tokens": "5"}, {"stream": 1}, {"top_k": 10**20}, {"tool_choice": {"type": "tool"}},
                {"temperature": 1.5}):
        with pytest.raises(pydantic.ValidationError):
            MessagesRequest.model_validate({**base, **bad})


@pytest.mark.parametrize("fields,message", [
    ({"output_config": {"effort": "high"}}, "output_config.effort is not supported"),
    ({"thinking": {"type": "between_tools"}}, "between_tools"),
])
def test_anthropic_fields_that_cannot_be_honoured_are_refused(fields, message):
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **fields}
    with pytest.raises(ValueError, match=message):
        MessagesRequest.model_validate(body)
