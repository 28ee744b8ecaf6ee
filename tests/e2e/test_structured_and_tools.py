"""Structured outputs and tool calling through the OpenAI SDK (the engine enforces the grammar;
these check the server's wiring: request fields -> constraint, output -> tool_calls)."""

from __future__ import annotations

import json

import openai
import pytest

ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"]}}}


def test_response_format_json_schema(openai_client, model_name):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
              "required": ["city"]}
    resp = openai_client.chat.completions.create(
        model=model_name, messages=ASK, max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}})
    assert "city" in json.loads(resp.choices[0].message.content)


def test_structured_outputs_regex_and_choice(openai_client, model_name):
    resp = openai_client.completions.create(model=model_name, prompt="A phone number:", max_tokens=20,
                                            temperature=0, extra_body={"structured_outputs": {"regex": r"\d{3}-\d{4}"}})
    text = resp.choices[0].text
    assert len(text) == 8 and text[3] == "-" and text.replace("-", "").isdigit()
    resp = openai_client.chat.completions.create(model=model_name, messages=ASK, max_tokens=5, temperature=0,
                                                 extra_body={"structured_outputs": {"choice": ["sunny", "rainy"]}})
    assert resp.choices[0].message.content in ("sunny", "rainy")


def test_invalid_constraints_are_400(openai_client, model_name):
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model=model_name, prompt="x", max_tokens=2,
                                         extra_body={"structured_outputs": {"regex": "(unclosed"}})
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=model_name, messages=ASK, max_tokens=2,
                                              response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=model_name, messages=ASK, max_tokens=2, tools=[WEATHER_TOOL],
                                              tool_choice={"type": "function", "function": {"name": "nope"}})
    # The engine is fine afterwards.
    ok = openai_client.completions.create(model=model_name, prompt="Hello", max_tokens=2)
    assert ok.choices[0].text


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(openai_client, model_name, tool_choice):
    resp = openai_client.chat.completions.create(model=model_name, messages=ASK, max_tokens=60, temperature=0,
                                                 tools=[WEATHER_TOOL], tool_choice=tool_choice,
                                                 parallel_tool_calls=False)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert "city" in json.loads(call.function.arguments)

    stream = openai_client.chat.completions.create(model=model_name, messages=ASK, max_tokens=60, temperature=0,
                                                   tools=[WEATHER_TOOL], tool_choice=tool_choice,
                                                   parallel_tool_calls=False, stream=True)
    name, arguments, finish = None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            name = delta_call.function.name or name
            arguments += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call.function.arguments)


def test_tool_results_round_trip_in_the_conversation(openai_client, model_name):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                                                               "function": {"name": "get_weather",
                                                                            "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    # tool_choice "none": SmolLM2's server has no tool-call parser, so "auto" (the default with
    # tools) is a 400 there, as in vLLM.
    resp = openai_client.chat.completions.create(model=model_name, messages=messages, max_tokens=20,
                                                 temperature=0, tools=[WEATHER_TOOL], tool_choice="none")
    assert resp.choices[0].message.content and resp.choices[0].finish_reason in ("stop", "length")


ANTHROPIC_TOOL = {"name": "get_weather", "description": "Current weather for a city",
                  "input_schema": WEATHER_TOOL["function"]["parameters"]}


@pytest.mark.parametrize("tool_choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_anthropic_forced_tool_use(anthropic_client, model_name, tool_choice):
    msg = anthropic_client.messages.create(model=model_name, max_tokens=60, messages=ASK, tools=[ANTHROPIC_TOOL],
                                           tool_choice={**tool_choice, "disable_parallel_tool_use": True},
                                           extra_body={"temperature": 0})
    assert msg.stop_reason == "tool_use"
    use = [b for b in msg.content if b.type == "tool_use"][0]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and "city" in use.input

    events = list(anthropic_client.messages.create(
        model=model_name, max_tokens=60, messages=ASK, tools=[ANTHROPIC_TOOL], stream=True,
        tool_choice={**tool_choice, "disable_parallel_tool_use": True}, extra_body={"temperature": 0}))
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts][-1] == "tool_use"
    assert types.count("content_block_start") == types.count("content_block_stop")
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == use.input
    assert events[-2].delta.stop_reason == "tool_use"


def test_anthropic_tool_result_turn(anthropic_client, model_name):
    messages = ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C, sunny"}]}]
    msg = anthropic_client.messages.create(model=model_name, max_tokens=20, messages=messages,
                                           tools=[ANTHROPIC_TOOL], tool_choice={"type": "none"},
                                           extra_body={"temperature": 0})
    assert msg.content[0].type == "text" and msg.stop_reason in ("end_turn", "max_tokens")
    count = anthropic_client.messages.count_tokens(model=model_name, messages=messages, tools=[ANTHROPIC_TOOL])
    assert count.input_tokens > 0
