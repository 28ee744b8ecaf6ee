"""Unmodified third-party clients against a real `tokenmill serve` (the embedded SmolLM2-135M,
the e2e session server): `instructor` (TOOLS, JSON_SCHEMA, `create_partial` streaming),
`langchain-openai` (`bind_tools`, `with_structured_output` in each method), the `openai` SDK's
`chat.completions.parse`, `responses.create` / `.stream` / `.parse` and `models.retrieve`, the
`anthropic` SDK's `messages.parse`, and lm-eval's `local-completions` loglikelihood against HF.

The model's template drops `tools` and it writes no tool-call format of its own, so what runs here
is what the engine's grammars force (named and required tool choices, response formats); the
model-format parsers and `tool_choice="auto"` are driven by scripted outputs in
tests/server/test_agent_formats.py and tests/server/test_responses_api.py.
"""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
from pydantic import BaseModel

from conftest import API_KEY, serve_argv
from server_harness import running_server


class City(BaseModel):
    name: str
    population: int


ASK = [{"role": "user", "content": "Paris?"}]
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string", "maxLength": 20}},
                                                "required": ["city"]}}}


# ----- instructor -----
@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_modes(openai_client, model_name, mode):
    import instructor
    client = instructor.from_openai(openai_client, mode=getattr(instructor.Mode, mode))
    city = client.chat.completions.create(model=model_name, response_model=City, messages=ASK, max_tokens=60,
                                          temperature=0, max_retries=0)
    assert isinstance(city, City) and city.name


def test_instructor_create_partial_streams_tools(openai_client, model_name):
    """instructor's streaming TOOLS mode reads the named tool call's argument deltas: each
    partial object is a prefix of the final one."""
    import instructor
    client = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS)
    partials = list(client.chat.completions.create_partial(model=model_name, response_model=City, messages=ASK,
                                                           max_tokens=60, temperature=0, max_retries=0))
    assert len(partials) > 2 and partials[-1].name and partials[-1].population is not None
    whole = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS).chat.completions.create(
        model=model_name, response_model=City, messages=ASK, max_tokens=60, temperature=0, max_retries=0)
    assert partials[-1].model_dump() == whole.model_dump()


# ----- langchain-openai -----
@pytest.fixture()
def chat_model(server, model_name):
    from langchain_openai import ChatOpenAI
    return ChatOpenAI(model=model_name, api_key=API_KEY, base_url=f"{server.url}/v1", temperature=0, max_tokens=100,
                      max_retries=0)


@pytest.mark.parametrize("tool_choice", ["get_weather", "required"])
def test_langchain_bind_tools(chat_model, tool_choice):
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    bound = chat_model.bind_tools([get_weather], tool_choice=tool_choice)
    message = bound.invoke("Weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"] and "city" in message.tool_calls[0]["args"]
    chunks = list(bound.stream("Weather in Paris?"))
    merged = chunks[0]
    for chunk in chunks[1:]:
        merged = merged + chunk
    assert merged.tool_calls[0]["args"] == message.tool_calls[0]["args"]


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(chat_model, method):
    city = chat_model.with_structured_output(City, method=method).invoke("Paris?")
    assert isinstance(city, City) and city.name


def test_langchain_json_mode_gets_a_json_object(chat_model):
    # json_mode promises JSON, not the schema (as at OpenAI); the 135M model's object may lack keys.
    out = chat_model.with_structured_output(City, method="json_mode", include_raw=True).invoke("Paris?")
    assert isinstance(json.loads(out["raw"].content), dict)
    assert out["raw"].response_metadata["finish_reason"] == "stop"


# ----- the openai SDK -----
def test_chat_completions_parse(openai_client, model_name):
    parsed = openai_client.chat.completions.parse(model=model_name, messages=ASK, response_format=City,
                                                  max_tokens=60, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, City)


def test_models_retrieve(openai_client, model_name):
    assert openai_client.models.retrieve(model_name).id == model_name
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("no-such-model")


def test_responses_create_matches_chat(openai_client, model_name):
    """A response runs like the same chat completion: same greedy text."""
    chat = openai_client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=12, temperature=0)
    response = openai_client.responses.create(model=model_name, input="Say hi", max_output_tokens=12, temperature=0)
    assert response.output_text == chat.choices[0].message.content
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens


def test_responses_stream_and_previous_response(openai_client, model_name):
    with openai_client.responses.stream(model=model_name, input="Say hi", max_output_tokens=60,
                                        temperature=0) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text and final.output_text == text and final.status == "completed"
    follow = openai_client.responses.create(model=model_name, input="And again?", previous_response_id=final.id,
                                            max_output_tokens=8, temperature=0)
    assert follow.previous_response_id == final.id and follow.output_text
    # The stored conversation is in the prompt: more input tokens than the new turn alone.
    alone = openai_client.responses.create(model=model_name, input="And again?", max_output_tokens=8,
                                           temperature=0)
    assert follow.usage.input_tokens > alone.usage.input_tokens + final.usage.output_tokens


def test_responses_parse_and_forced_function_call(openai_client, model_name):
    parsed = openai_client.responses.parse(model=model_name, input="Paris?", text_format=City,
                                           max_output_tokens=60, temperature=0)
    assert isinstance(parsed.output_parsed, City)
    tool = {"type": "function", "name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    response = openai_client.responses.create(model=model_name, input="Weather in Paris?", tools=[tool],
                                              tool_choice={"type": "function", "name": "get_weather"},
                                              max_output_tokens=60, temperature=0)
    call, = [item for item in response.output if item.type == "function_call"]
    assert call.name == "get_weather" and "city" in json.loads(call.arguments)


def test_auto_tool_choice_without_a_parser_is_400(openai_client, model_name):
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        openai_client.chat.completions.create(model=model_name, messages=ASK, tools=[WEATHER], max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="--tool-call-parser"):
        openai_client.responses.create(model=model_name, input="Paris?", max_output_tokens=5,
                                       tools=[{"type": "function", "name": "get_weather"}])


def test_forced_tool_choice_with_response_format(openai_client, model_name):
    """openai-agents sends both when an agent has an output_type and tool_choice="required": the
    forced calls win for that turn."""
    resp = openai_client.chat.completions.create(
        model=model_name, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "City", "schema": City.model_json_schema()}})
    assert resp.choices[0].message.tool_calls[0].function.name == "get_weather"


# ----- the anthropic SDK -----
def test_anthropic_messages_parse(anthropic_client, model_name):
    message = anthropic_client.messages.parse(model=model_name, max_tokens=60, messages=ASK, output_format=City)
    assert isinstance(message.parsed_output, City)


def test_anthropic_refusals_in_anthropics_format(anthropic_client, model_name):
    import anthropic
    with pytest.raises(anthropic.BadRequestError, match="--reasoning-parser") as err:
        anthropic_client.messages.create(model=model_name, max_tokens=60, messages=ASK,
                                         thinking={"type": "enabled", "budget_tokens": 20})
    assert err.value.body["type"] == "error" and err.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="output_config.effort"):
        anthropic_client.messages.create(model=model_name, max_tokens=60, messages=ASK,
                                         extra_body={"output_config": {"effort": "high"}})


# ----- legacy completions: echo for scoring -----
def test_completions_echo_offsets_and_scoring_call(openai_client, model_name):
    prompt = "The capital of France is Paris"
    scored = openai_client.completions.create(model=model_name, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                              temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and "".join(lp.tokens) == prompt
    assert lp.tokens[0] != "" and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert scored.usage.completion_tokens == 0


# ----- lm-eval -----
FACTS = [{"question": "The capital of France is", "choices": [" Paris", " London", " Rome"], "answer": 0},
         {"question": "2 + 2 =", "choices": [" 4", " 5"], "answer": 0},
         {"question": "Water is made of hydrogen and", "choices": [" oxygen", " gold"], "answer": 0}]


def test_lm_eval_local_task_loglikelihood_matches_hf(tmp_path, monkeypatch):
    """lm-eval's `local-completions` model runs a small local multiple-choice task through
    `/v1/completions` (echo, max_tokens 0, logprobs); on a float32 server every continuation's
    loglikelihood is HF transformers' on the same weights."""
    import lm_eval
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.config.gguf_cache import converted_folder
    from tokenmill.config.model_source import default_gguf_path

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "facts.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in FACTS))
    task = {"task": "tiny_facts", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{answer}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    folder = str(converted_folder(default_gguf_path()))  # the HF folder the server loads
    with running_server(lambda port: serve_argv(port) + ["--dtype", "float32"], api_key=API_KEY) as server:
        results = lm_eval.simple_evaluate(
            model="local-completions", tasks=[task], log_samples=True,
            model_args={"base_url": f"{server.url}/v1/completions", "model": "SmolLM2-135M-Instruct",
                        "tokenizer": folder, "tokenizer_backend": "huggingface", "max_retries": 1,
                        "header": {"Authorization": f"Bearer {API_KEY}"}})
    assert results["results"]["tiny_facts"]["acc,none"] == 1.0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    scored = 0
    for sample in results["samples"]["tiny_facts"]:
        for (context, continuation), ((logprob, _),) in zip(sample["arguments"], sample["resps"]):
            ctx = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
            expected = sum(logits[i - 1, whole[i]].item() for i in range(len(ctx), len(whole)))
            assert math.isclose(logprob, expected, abs_tol=5e-5), (context, continuation, logprob, expected)
            scored += 1
    assert scored == sum(len(doc["choices"]) for doc in FACTS)
