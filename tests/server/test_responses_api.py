"""`/v1/responses` through the unmodified `openai` SDK (`responses.create`, `.stream`, `.parse`,
`.retrieve`, `.delete`) against the real server stack over the scripted fake engine
(`server_fakes.py`, `FAKE_SCRIPT`): no small model writes Qwen3's `<think>` and Hermes
`<tool_call>` formats by itself, so the replies are scripted, while every layer between the SDK
and the engine (protocol, chat template, reasoning and tool parsers, event stream, store) is the
server's own. The server runs `--reasoning-parser qwen3 --tool-call-parser hermes`.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel

from server_harness import start_scripted_server
from tokenmill.entrypoints.openai.responses.store import ResponseStore

KEY = "sk-responses"
WEATHER_CALL = ('<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                '"arguments": {"city": "Paris"}}\n</tool_call>')
# [prompt substring, reply]: the first rule found in the rendered prompt answers (`<role>content`
# per message, `server_fakes.FakeInputProcessor.render_chat`).
SCRIPT = [
    ["<tool>sunny, 21C", "<think>\nThe tool answered.\n</think>\n\nIt is sunny in Paris, 21C."],
    ["weather in Paris", WEATHER_CALL],
    ["Nice to meet you, Ada.<user>What is my name?", "Your name is Ada."],
    ["My name is Ada", "Nice to meet you, Ada."],
    ["<system>Answer like a pirate.<user>Hi", "Arr, ahoy!"],
    ["Give the city as JSON", '<think>\nParis, in France.\n</think>\n\n{"city": "Paris", "country": "France"}'],
    ["Say hello", "<think>\nA greeting is asked for.\n</think>\n\nHello there!"],
    ["Tell a long story", "Once upon a time there was a very long story."],
]
TOOLS = [{"type": "function", "name": "get_weather", "description": "weather now",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"]}}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = start_scripted_server(KEY, SCRIPT, max_model_len=2048)
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(api_key=KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=30)


def test_create_returns_reasoning_then_message(client):
    response = client.responses.create(model="fake-model", input="Say hello")
    assert response.status == "completed" and response.object == "response"
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == "A greeting is asked for."
    assert response.output_text == "Hello there!"
    usage = response.usage
    assert usage.output_tokens == len(SCRIPT[6][1]) and usage.total_tokens == usage.input_tokens + usage.output_tokens
    # The reasoning tokens run through the end marker: "<think>\nA greeting is asked for.\n</think>".
    assert usage.output_tokens_details.reasoning_tokens == len("<think>\nA greeting is asked for.\n</think>")


def test_stream_events_build_the_same_response(client):
    whole = client.responses.create(model="fake-model", input="Say hello")
    kinds, text, reasoning = [], "", ""
    with client.responses.stream(model="fake-model", input="Say hello") as stream:
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.reasoning_text.delta":
                reasoning += event.delta
        final = stream.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    for kind in ("response.output_item.added", "response.content_part.added", "response.output_text.done",
                 "response.content_part.done", "response.output_item.done"):
        assert kind in kinds
    assert (reasoning, text) == ("A greeting is asked for.", "Hello there!")
    assert final.output_text == whole.output_text and final.status == "completed"
    assert [i.type for i in final.output] == ["reasoning", "message"]


def test_stream_sequence_numbers_count_up(server):
    body = {"model": "fake-model", "input": "Say hello", "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, headers=server.headers()) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))


@pytest.mark.parametrize("stream", [False, True])
def test_function_tool_round_trip_with_previous_response_id(client, stream):
    def create(**kwargs):
        if not stream:
            return client.responses.create(model="fake-model", tools=TOOLS, **kwargs)
        with client.responses.stream(model="fake-model", tools=TOOLS, **kwargs) as s:
            deltas = "".join(e.delta for e in s if e.type == "response.function_call_arguments.delta")
            final = s.get_final_response()
        calls = [i for i in final.output if i.type == "function_call"]
        assert deltas == "".join(c.arguments for c in calls)
        return final

    first = create(input="What is the weather in Paris?")
    calls = [item for item in first.output if item.type == "function_call"]
    assert [item.type for item in first.output] == ["reasoning", "function_call"]
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Paris"}
    assert calls[0].call_id
    # The caller runs the tool and sends its output, chaining on the stored response.
    second = create(previous_response_id=first.id,
                    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21C"}])
    assert second.output_text == "It is sunny in Paris, 21C."
    assert second.previous_response_id == first.id


def test_function_call_items_in_the_input_without_the_store(client):
    """A client that keeps the conversation itself sends the call and its output back."""
    response = client.responses.create(model="fake-model", tools=TOOLS, store=False, input=[
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21C"},
    ])
    assert response.output_text == "It is sunny in Paris, 21C."


def test_previous_response_id_carries_the_conversation(client):
    first = client.responses.create(model="fake-model", input="My name is Ada")
    assert first.output_text == "Nice to meet you, Ada."
    second = client.responses.create(model="fake-model", input="What is my name?", previous_response_id=first.id)
    assert second.output_text == "Your name is Ada."
    assert client.responses.retrieve(first.id).output_text == first.output_text


def test_unknown_or_unstored_previous_response_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model="fake-model", input="hi", previous_response_id="resp_nope")
    assert err.value.body["param"] == "previous_response_id"
    unstored = client.responses.create(model="fake-model", input="My name is Ada", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="fake-model", input="What is my name?", previous_response_id=unstored.id)


def test_delete_forgets_a_response(client):
    response = client.responses.create(model="fake-model", input="Say hello")
    client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_instructions_are_the_system_turn(client):
    response = client.responses.create(model="fake-model", input="Hi", instructions="Answer like a pirate.")
    assert response.output_text == "Arr, ahoy!" and response.instructions == "Answer like a pirate."


def test_max_output_tokens_makes_an_incomplete_response(client):
    response = client.responses.create(model="fake-model", input="Tell a long story", max_output_tokens=9)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Once upon" and response.usage.output_tokens == 9


def test_text_format_json_schema_after_the_thinking(client):
    class City(BaseModel):
        city: str
        country: str

    parsed = client.responses.parse(model="fake-model", input="Give the city as JSON", text_format=City)
    assert parsed.output_parsed == City(city="Paris", country="France")
    assert parsed.output[0].type == "reasoning" and parsed.output[0].content[0].text == "Paris, in France."


@pytest.mark.parametrize("fields,param", [
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"background": True}, "background"),
    ({"truncation": "auto"}, "truncation"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"text": {"verbosity": "low"}}, "verbosity"),
    ({"reasoning": {"summary": "auto"}}, "summary"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input"),
    ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template"),
    ({"tool_choice": "auto", "tools": TOOLS, "thinking_token_budget": -1}, "thinking_token_budget"),
])
def test_unsupported_fields_are_400_naming_them(client, fields, param):
    body = {"model": "fake-model", "input": "Say hello", **fields}
    with pytest.raises(openai.BadRequestError) as err:
        client.post("/responses", cast_to=httpx.Response, body=body)
    assert param in json.dumps(err.value.body)


def test_api_key_is_required(server):
    r = httpx.post(f"{server.url}/v1/responses", json={"input": "Say hello"})
    assert r.status_code == 401
    assert httpx.get(f"{server.url}/v1/responses/resp_x").status_code == 401


def test_openapi_lists_the_responses_request_model(server):
    doc = httpx.get(f"{server.url}/openapi.json", headers=server.headers()).json()
    post = doc["paths"]["/v1/responses"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    model = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"input", "instructions", "tools", "previous_response_id", "max_output_tokens", "text"} <= set(
        model["properties"])
    assert "404" in doc["paths"]["/v1/responses/{response_id}"]["get"]["responses"]


def test_store_is_lru_and_bounded_by_count_and_bytes():
    store = ResponseStore(max_entries=2, max_bytes=10_000)
    for name in ("a", "b"):
        store.put({"id": name}, [{"role": "user", "content": name}])
    assert store.get("a") is not None  # a is now the most recent
    store.put({"id": "c"}, [])
    assert store.get("b") is None and store.get("a") is not None and len(store) == 2
    big = [{"role": "user", "content": "x" * 6000}]
    store.put({"id": "d"}, big)
    store.put({"id": "e"}, big)  # two of these exceed the bytes: the older goes
    assert store.get("d") is None and store.get("e") is not None and store.num_bytes <= 10_000
    store.put({"id": "huge"}, [{"role": "user", "content": "x" * 20_000}])
    assert store.get("huge") is None and store.get("e") is not None


def test_405_allow_lists_every_method_of_the_path(server):
    r = httpx.request("PUT", f"{server.url}/v1/responses/resp_x", headers=server.headers())
    assert r.status_code == 405 and {"GET", "DELETE"} <= {m.strip() for m in r.headers["allow"].split(",")}
