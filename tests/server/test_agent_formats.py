"""Reasoning and tool calls in the formats reasoning/agent models write, read by the server and
consumed by unmodified clients: `openai-agents` (an agent with a function tool and an
`output_type`, over Chat Completions and over Responses), the `openai` SDK's streamed chat
(`reasoning_content` deltas, one `tool_calls` entry per index per chunk) and the `anthropic`
SDK (thinking blocks, `thinking_delta` events, tool_use).

The engine is the scripted fake (`server_fakes.py`, `FAKE_SCRIPT`): the small real model cannot
write Qwen3's `<think>` or Hermes `<tool_call>` text, so the replies are scripted and everything
between the client and the engine is the server's own. The server runs
`--reasoning-parser qwen3 --tool-call-parser hermes`. Grammars are not applied by the fake;
the real model's grammar-forced paths are tested in tests/e2e/test_agent_clients.py.
"""

from __future__ import annotations

import asyncio
import json

import anthropic
import httpx
import openai
import pytest
from pydantic import BaseModel

from server_harness import start_scripted_server

KEY = "sk-agents"
PARIS = '{"city": "Paris"}'
SCRIPT = [
    # openai-agents: the tool's result is in the prompt -> the final answer as the output type's JSON.
    ["<tool>sunny, 21C", '<think>\nThe tool said sunny.\n</think>\n\n{"city": "Paris", "forecast": "sunny, 21C"}'],
    # the first turn: think, then call the tool.
    ["weather in Paris", '<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                         '"arguments": {"city": "Paris"}}\n</tool_call>'],
    # a forced turn (tool_choice="required") writes the grammar's form: a JSON array of calls.
    ["Forecast for Paris", '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                           '{"name": "get_weather", "arguments": {"city": "Rome"}}]'],
    # a named tool_choice writes the arguments object alone.
    ["Named call please", PARIS],
    ["Weather in Paris and Rome", '<think>\nTwo cities.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                                  '"arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n{"name": '
                                  '"get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'],
    ["Think about Paris", "<think>\nParis is in France.\n</think>\n\nParis is the capital of France."],
]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather now", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = start_scripted_server(KEY, SCRIPT, max_model_len=4096)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=30)


# ----- openai-agents -----
class Forecast(BaseModel):
    city: str
    forecast: str


def _run_agent(server, api: str, tool_choice: str | None, question: str) -> tuple[Forecast, list[str]]:
    import agents
    agents.set_tracing_disabled(True)
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather now in a city."""
        cities.append(city)
        return "sunny, 21C"

    client = openai.AsyncOpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=30)
    model = (agents.OpenAIChatCompletionsModel if api == "chat" else agents.OpenAIResponsesModel)(
        model="fake-model", openai_client=client)
    agent = agents.Agent(name="forecaster", instructions="Answer with the forecast.", tools=[get_weather],
                         output_type=Forecast, model=model,
                         model_settings=agents.ModelSettings(tool_choice=tool_choice))
    result = asyncio.run(agents.Runner.run(agent, question))
    return result.final_output, cities


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_agents_function_tool_and_output_type(server, api):
    output, cities = _run_agent(server, api, None, "What is the weather in Paris?")
    assert output == Forecast(city="Paris", forecast="sunny, 21C") and cities == ["Paris"]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_openai_agents_required_tool_choice_with_output_type(server, api):
    """openai-agents sends tool_choice "required" with the output type's response format; the
    forced calls win for that turn, and the next turn (tool_choice reset) answers in the format."""
    output, cities = _run_agent(server, api, "required", "Forecast for Paris")
    assert output == Forecast(city="Paris", forecast="sunny, 21C") and cities == ["Paris", "Rome"]


# ----- OpenAI chat: reasoning and tool-call deltas -----
def _chunks(server, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True},
                      headers=server.headers(), timeout=30) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def _tool_calls_of(chunks: list[dict]) -> dict[int, dict]:
    """Tool calls put together from the deltas; each index appears at most once per chunk."""
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            entries = choice["delta"].get("tool_calls") or []
            assert len({e["index"] for e in entries}) == len(entries), entries
            for e in entries:
                call = calls.setdefault(e["index"], {"id": None, "name": "", "arguments": ""})
                call["id"] = call["id"] or e.get("id")
                call["name"] += e["function"].get("name") or ""
                call["arguments"] += e["function"].get("arguments") or ""
    return calls


def test_chat_returns_reasoning_and_parallel_hermes_calls(client, server):
    user = [{"role": "user", "content": "Weather in Paris and Rome"}]
    message = client.chat.completions.create(model="fake-model", messages=user, tools=[TOOL]).choices[0]
    assert message.finish_reason == "tool_calls"
    assert message.message.reasoning_content == "Two cities."
    assert [json.loads(c.function.arguments) for c in message.message.tool_calls] == [
        {"city": "Paris"}, {"city": "Rome"}]
    chunks = _chunks(server, {"messages": user, "tools": [TOOL]})
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks if c["choices"])
    assert reasoning == "Two cities."
    calls = _tool_calls_of(chunks)
    assert [json.loads(c["arguments"]) for c in calls.values()] == [{"city": "Paris"}, {"city": "Rome"}]
    assert all(c["id"] and c["name"] == "get_weather" for c in calls.values())
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_streamed_named_tool_choice_is_one_entry_per_index(client, server):
    """The first chunk of a named tool_choice carries the call's id, name and first argument
    fragment in one entry (instructor's streaming TOOLS mode reads the `{` from it)."""
    body = {"messages": [{"role": "user", "content": "Named call please"}], "tools": [TOOL],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    chunks = _chunks(server, body)
    first = next(c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls"))
    entry, = first["choices"][0]["delta"]["tool_calls"]
    assert entry["id"] and entry["function"]["name"] == "get_weather" and entry["function"]["arguments"] == "{"
    calls = _tool_calls_of(chunks)
    assert list(calls) == [0] and calls[0]["arguments"] == PARIS


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_cut_by_max_tokens_returns_the_complete_calls(client, server, stream):
    reply = SCRIPT[2][1]
    cut = reply.index("Rome") + 2  # inside the second call's arguments
    body = {"messages": [{"role": "user", "content": "Forecast for Paris"}], "tools": [TOOL],
            "tool_choice": "required", "max_tokens": cut}
    if not stream:
        choice = client.chat.completions.create(model="fake-model", **body).choices[0]
        assert choice.finish_reason == "length" and choice.message.content is None
        assert [json.loads(c.function.arguments) for c in choice.message.tool_calls] == [{"city": "Paris"}]
        return
    # Streamed, the cut call's fragments were already sent (as OpenAI streams a cut call):
    # the first call is whole, the stream ends with "length", and no JSON becomes content.
    chunks = _chunks(server, body)
    calls = _tool_calls_of(chunks)
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"} and list(calls) == [0, 1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert not any(c["choices"][0]["delta"].get("content") for c in chunks if c["choices"])


# ----- Anthropic: thinking blocks -----
@pytest.fixture()
def claude(server):
    return anthropic.Anthropic(api_key=KEY, base_url=server.url, max_retries=0, timeout=30)


def test_anthropic_thinking_blocks_when_enabled(claude):
    ask = {"model": "fake-model", "max_tokens": 200, "messages": [{"role": "user", "content": "Think about Paris"}]}
    enabled = claude.messages.create(**ask, thinking={"type": "enabled", "budget_tokens": 100})
    assert [b.type for b in enabled.content] == ["thinking", "text"]
    assert enabled.content[0].thinking == "Paris is in France."
    assert enabled.content[1].text == "Paris is the capital of France."
    plain = claude.messages.create(**ask)
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text == "Paris is the capital of France."


def test_anthropic_streams_thinking_deltas(claude):
    ask = {"model": "fake-model", "max_tokens": 200, "messages": [{"role": "user", "content": "Think about Paris"}],
           "thinking": {"type": "enabled", "budget_tokens": 100}}
    thinking = text = ""
    with claude.messages.stream(**ask) as stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "thinking_delta":
                thinking += event.delta.thinking
            elif event.type == "content_block_delta" and event.delta.type == "text_delta":
                text += event.delta.text
        final = stream.get_final_message()
    assert (thinking, text) == ("Paris is in France.", "Paris is the capital of France.")
    assert [b.type for b in final.content] == ["thinking", "text"]


def test_anthropic_tool_use_after_thinking(claude):
    tool = {"name": "get_weather", "description": "weather now", "input_schema": TOOL["function"]["parameters"]}
    message = claude.messages.create(model="fake-model", max_tokens=300, tools=[tool],
                                     messages=[{"role": "user", "content": "Weather in Paris and Rome"}])
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "input", None)) for b in message.content] == [
        ("tool_use", {"city": "Paris"}), ("tool_use", {"city": "Rome"})]
