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
    resp = openai_client.chat.completions.create(model=model_name, messages=messages, max_tokens=20,
                                                 temperature=0, tools=[WEATHER_TOOL])
    assert resp.choices[0].message.content and resp.choices[0].finish_reason in ("stop", "length")
