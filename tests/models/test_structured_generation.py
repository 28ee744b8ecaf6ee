"""Constrained decoding end to end on the embedded model: every output follows its constraint."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tokenmill import SamplingParams, StructuredOutputsParams

SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"},
                                      "point": {"type": "object", "properties": {"x": {"type": "number"},
                                                                                 "y": {"type": "number"}},
                                                "required": ["x", "y"]}},
     "required": ["ok", "point"]},
]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm_fp32, temperature):
    prompts = ["Describe a person as JSON.", "Pick some colors as JSON.", "Give a point as JSON."]
    params = [SamplingParams(temperature=temperature, seed=3, max_tokens=96,
                             structured_outputs=StructuredOutputsParams(json=schema)) for schema in SCHEMAS]
    outs = llm_fp32.generate(prompts, params, use_tqdm=False)
    for out, schema in zip(outs, SCHEMAS):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", completion.text
        jsonschema.validate(json.loads(completion.text), schema)


def test_regex_and_choice(llm_fp32):
    regex = SamplingParams(temperature=1.0, seed=1, max_tokens=20,
                           structured_outputs=StructuredOutputsParams(regex=r"[A-Z][a-z]{2,8}-\d{3}"))
    choice = SamplingParams(temperature=1.0, seed=2, max_tokens=10,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
    free = SamplingParams(temperature=0, max_tokens=8)
    r, c, f = llm_fp32.generate(["Code:", "Answer yes or no:", "Hello"], [regex, choice, free], use_tqdm=False)
    assert re.fullmatch(r"[A-Z][a-z]{2,8}-\d{3}", r.outputs[0].text)
    assert c.outputs[0].text in ("yes", "no", "maybe")
    assert f.outputs[0].finish_reason in ("length", "stop")  # unconstrained rows are untouched


def test_bad_schema_is_a_value_error_and_engine_keeps_working(llm_fp32):
    with pytest.raises(ValueError):
        llm_fp32.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(
            json={"type": "object", "properties": {"a": {"type": "nonsense"}}})), use_tqdm=False)
    with pytest.raises(ValueError):
        llm_fp32.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed")),
                          use_tqdm=False)
    out = llm_fp32.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4),
                            use_tqdm=False)
    assert out[0].outputs[0].text


def test_fifty_schemas_on_the_embedded_model(llm_fp32):
    from json_schemas import SCHEMAS  # tests/ is on sys.path through its conftest

    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=160,
                             structured_outputs=StructuredOutputsParams(json=schema))
              for i, schema in enumerate(SCHEMAS)]
    prompts = [f"Reply with JSON matching this schema: {json.dumps(schema)}" for schema in SCHEMAS]
    outs = llm_fp32.generate(prompts, params, use_tqdm=False)
    finished = 0
    for out, schema in zip(outs, SCHEMAS):
        completion = out.outputs[0]
        if completion.finish_reason == "length":
            continue  # cut by max_tokens: a prefix of valid JSON, nothing to validate
        finished += 1
        jsonschema.validate(json.loads(completion.text), schema)
    assert finished >= 45
