"""Every model-format tool parser on outputs written as each family writes them, with parallel
calls and text before them: the whole-text result, and streamed deltas that add up to it in any
chunking (hypothesis), each call's id and name first and once."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.entrypoints.tool_parsers import TOOL_PARSERS, get_tool_parser

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}}}}]
PARIS, CET = {"city": "Paris", "days": 3}, {"tz": "CET"}

# (parser, output, content before the calls, [(name, arguments, the model's own id or None)])
CASES = [
    ("hermes", 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n'
               '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>',
     "Checking.\n", [("get_weather", PARIS, None), ("get_time", CET, None)]),
    ("qwen3", '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>', None,
     [("get_time", CET, None)]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris", "days": 3}}; '
                    '{"name": "get_time", "parameters": {"tz": "CET"}}', None,
     [("get_weather", PARIS, None), ("get_time", CET, None)]),
    ("deepseek_v3", "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
                    '```json\n{"city": "Paris", "days": 3}\n```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function'
                    '<｜tool▁sep｜>get_time\n```json\n{"tz": "CET"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
     "Let me check.", [("get_weather", PARIS, None), ("get_time", CET, None)]),
    ("deepseek_v31", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
                     '{"city": "Paris", "days": 3}<｜tool▁call▁end｜><｜tool▁call▁begin｜>get_time<｜tool▁sep｜>'
                     '{"tz": "CET"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
     None, [("get_weather", PARIS, None), ("get_time", CET, None)]),
    ("kimi_k2", "Checking both.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
                '<|tool_call_argument_begin|>{"city": "Paris", "days": 3}<|tool_call_end|><|tool_call_begin|>'
                'functions.get_time:1<|tool_call_argument_begin|>{"tz": "CET"}<|tool_call_end|>'
                "<|tool_calls_section_end|>",
     "Checking both.", [("get_weather", PARIS, "functions.get_weather:0"), ("get_time", CET, "functions.get_time:1")]),
    # MiniMax-M2 writes parameters as text; the tool's schema gives them back their JSON types.
    ("minimax_m2", 'Sure.\n<minimax:tool_call>\n<invoke name="get_weather">\n<parameter name="city">Paris</parameter>\n'
                   '<parameter name="days">3</parameter>\n</invoke>\n<invoke name="get_time">\n'
                   '<parameter name="tz">CET</parameter>\n</invoke>\n</minimax:tool_call>',
     "Sure.\n", [("get_weather", PARIS, None), ("get_time", CET, None)]),
    # Mistral tokenizer v3-v10: a JSON array after [TOOL_CALLS].
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}, '
                '{"name": "get_time", "arguments": {"tz": "CET"}}]',
     None, [("get_weather", PARIS, None), ("get_time", CET, None)]),
    # v11+: NAME{ARGS} per [TOOL_CALLS]; v13 with [CALL_ID] and [ARGS].
    ("mistral", '[TOOL_CALLS]get_weather{"city": "Paris", "days": 3}[TOOL_CALLS]get_time{"tz": "CET"}',
     None, [("get_weather", PARIS, None), ("get_time", CET, None)]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1B2c3D4e[ARGS]{"city": "Paris", "days": 3}',
     None, [("get_weather", PARIS, "a1B2c3D4e")]),
]


def streamed(name: str, text: str, cuts: list[int]) -> tuple[str, list[tuple[str, dict, str]]]:
    parser = get_tool_parser(name)(TOOLS)
    content, calls = "", []
    previous = ""
    deltas = []
    for end in sorted(set(cuts) | {len(text)}):
        current = text[:end]
        deltas.append(parser.extract_tool_calls_streaming(previous, current, current[len(previous):]))
        previous = current
    deltas.append(parser.finish_streaming(text))
    for delta in filter(None, deltas):
        content += delta.content or ""
        assert len({t.index for t in delta.tool_calls}) == len(delta.tool_calls)
        for t in delta.tool_calls:
            if t.name is not None:  # a call opens with its id and name, once, in index order
                assert t.index == len(calls) and t.id
                calls.append([t.name, "", t.id])
            else:
                assert t.id is None and t.index < len(calls)
            calls[t.index][1] += t.arguments or ""
    return content, [(n, json.loads(a), i) for n, a, i in calls]


@pytest.mark.parametrize("name,text,content,calls", CASES)
def test_whole_and_streamed(name, text, content, calls):
    result = get_tool_parser(name)(TOOLS).extract_tool_calls(text)
    assert result.tools_called and result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.tool_calls] == [(n, a) for n, a, _ in calls]
    assert [c.id for c in result.tool_calls] == [i for _, _, i in calls]
    for step in (1, 2, 7, len(text)):
        got_content, got = streamed(name, text, list(range(step, len(text), step)))
        assert got_content == (content or "")
        assert [(n, a) for n, a, _ in got] == [(n, a) for n, a, _ in calls]
        if any(own for *_, own in calls):  # the model's own ids go out as the call ids
            assert [i for *_, i in got] == [i for *_, i in calls]


@settings(max_examples=200, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_any_chunking(case, data):
    name, text, content, calls = case
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(text) - 1), max_size=25))
    got_content, got = streamed(name, text, cuts)
    assert got_content == (content or "") and [(n, a) for n, a, _ in got] == [(n, a) for n, a, _ in calls]


@pytest.mark.parametrize("name", sorted(TOOL_PARSERS))
def test_plain_answers_stay_content(name):
    text = "The weather in Paris is sunny: 21C, light wind {and braces}."
    result = get_tool_parser(name)(TOOLS).extract_tool_calls(text)
    assert not result.tools_called and result.content == text
    assert streamed(name, text, list(range(1, len(text), 3))) == (text, [])


def test_every_issue_format_is_registered():
    assert {"deepseek_v3", "deepseek_v31", "kimi_k2", "minimax_m2", "qwen3", "hermes", "llama3_json",
            "mistral"} <= set(TOOL_PARSERS)
