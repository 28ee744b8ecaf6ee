"""A real `tokenmill serve` with a thinking chat template: structured output and forced tool
calls after the thinking, on every route, with the flags a reasoning deployment uses.

The server runs the embedded SmolLM2-135M with an inline `--chat-template` written like Qwen3's
(the generation prompt opens `<think>`; `enable_thinking: false` closes it at once),
`--reasoning-parser qwen3`, `--tool-call-parser hermes --enable-auto-tool-choice`,
`--generation-config` (a folder whose generation_config.json makes sampling greedy and short by
default), `--response-role bot` and `--log-level debug` after the subcommand. The small model
never closes its thinking by itself, so each request gives a thinking budget: after that many
tokens the engine forces `</think>`, and the grammar (a JSON schema, a forced tool call) applies
from there on. Were the grammar applied from the first token, the output would be JSON inside an
unclosed thinking: no answer at all.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from conftest import API_KEY, serve_argv
from server_harness import running_server

TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools, called as <tool_call>{\"name\": ..., \"arguments\": ...}"
    "</tool_call>:\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.reasoning_content is defined and m.reasoning_content %}<think>\n{{ m.reasoning_content }}\n"
    "</think>\n\n{% endif %}{{ m['content'] or '' }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n"
    "{% else %}<think>\n{% endif %}{% endif %}"
)
DEFAULT_MAX_TOKENS = 60
BUDGET = 8


class City(BaseModel):
    name: str
    # Bounded, so that the grammar ends the number: the greedy 135M model can repeat a digit past any
    # token budget (seen with some CPUs' rounding), which would test the model, not the engine.
    population: int = Field(ge=0, le=99_999_999)


ASK = [{"role": "user", "content": "Paris?"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "City", "schema": City.model_json_schema()}}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation")
    (folder / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "max_new_tokens": DEFAULT_MAX_TOKENS}))

    def argv(port: int) -> list[str]:
        return serve_argv(port) + ["--chat-template", TEMPLATE, "--reasoning-parser", "qwen3",
                                   "--tool-call-parser", "hermes", "--enable-auto-tool-choice",
                                   "--generation-config", str(folder), "--response-role", "bot",
                                   "--log-level", "debug"]

    with running_server(argv, api_key=API_KEY) as srv:
        yield srv


@pytest.fixture()
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{server.url}/v1", max_retries=0, timeout=120)


def _chat(server, **body) -> dict:
    r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers(), timeout=120,
                   json={"messages": ASK, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_thinking_then_schema_valid_json(server):
    message = _chat(server, response_format=SCHEMA, thinking_token_budget=BUDGET, max_tokens=80)["choices"][0]["message"]
    assert message["role"] == "bot"  # --response-role
    assert message["reasoning_content"] and message["reasoning"] == message["reasoning_content"]
    City.model_validate_json(message["content"])


def test_streamed_thinking_then_json_matches_the_whole(server):
    body = {"messages": ASK, "response_format": SCHEMA, "thinking_token_budget": BUDGET, "max_tokens": 80,
            "stream": True}
    reasoning = content = ""
    order = []
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=server.headers(),
                      timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("reasoning_content"):
                reasoning += delta["reasoning_content"]
                order.append("r")
            if delta.get("content"):
                content += delta["content"]
                order.append("c")
    whole = _chat(server, response_format=SCHEMA, thinking_token_budget=BUDGET, max_tokens=80)
    message = whole["choices"][0]["message"]
    assert (reasoning, content) == (message["reasoning_content"], message["content"])
    assert order == sorted(order, key=lambda k: k == "c")  # all thinking first


def test_thinking_switched_off_in_the_template(server):
    message = _chat(server, response_format=SCHEMA, max_tokens=80,
                    chat_template_kwargs={"enable_thinking": False})["choices"][0]["message"]
    assert message["reasoning_content"] is None
    City.model_validate_json(message["content"])


def test_forced_tool_call_after_thinking(client):
    choice = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK,
                                            tools=[TOOL], tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}},
                                            max_tokens=80, extra_body={"thinking_token_budget": BUDGET}).choices[0]
    assert choice.message.reasoning_content
    assert "city" in json.loads(choice.message.tool_calls[0].function.arguments)


def test_auto_tool_choice_is_served(client):
    """With --tool-call-parser hermes (and vLLM's --enable-auto-tool-choice) "auto" is served: the
    small model answers in text, which comes back as content after its thinking."""
    choice = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK, tools=[TOOL],
                                            max_tokens=40, extra_body={"thinking_token_budget": BUDGET}).choices[0]
    assert choice.message.reasoning_content and choice.finish_reason in ("stop", "length", "tool_calls")


def test_responses_reasoning_item_then_parsed_output(client):
    parsed = client.responses.parse(model=client.models.list().data[0].id, input="Paris?", text_format=City,
                                    max_output_tokens=80, extra_body={"thinking_token_budget": BUDGET})
    assert [item.type for item in parsed.output] == ["reasoning", "message"]
    assert parsed.output[0].content[0].text and isinstance(parsed.output_parsed, City)
    assert 0 < parsed.usage.output_tokens_details.reasoning_tokens < parsed.usage.output_tokens


def test_anthropic_thinking_then_parsed_output(server):
    import anthropic
    claude = anthropic.Anthropic(api_key=API_KEY, base_url=server.url, max_retries=0, timeout=120)
    message = claude.messages.parse(model=claude.models.list().data[0].id, max_tokens=80, messages=ASK,
                                    output_format=City, thinking={"type": "enabled", "budget_tokens": BUDGET})
    assert [b.type for b in message.content] == ["thinking", "text"] and message.content[0].thinking
    assert isinstance(message.parsed_output, City)


def test_generation_config_sampling_defaults(client):
    """generation_config.json's temperature 0 and max_new_tokens apply to requests that leave them
    unset: the same greedy text twice, at most DEFAULT_MAX_TOKENS long."""
    model = client.models.list().data[0].id
    first, second = (client.completions.create(model=model, prompt="Once upon a time") for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.completion_tokens == DEFAULT_MAX_TOKENS or first.choices[0].finish_reason == "stop"
    assert first.usage.completion_tokens <= DEFAULT_MAX_TOKENS


def test_log_level_after_the_subcommand(server):
    assert " DEBUG " in server.log()
