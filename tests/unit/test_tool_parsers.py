"""Tool-call parsers: non-streaming extraction, and streaming deltas that add up to the same calls
however the text is split into chunks."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.entrypoints.tool_parsers import ToolCall, get_tool_parser
from tokenmill.entrypoints.tool_parsers.tool_grammar import (
    forced_tool_call_parser,
    named_tool_params,
    parse_forced_tool_calls,
    required_tool_calls_params,
    tool_choice_params,
)


def stream(parser_name: str, text: str, cuts: list[int]) -> tuple[str, list[ToolCall], list]:
    """Feed `text` in chunks ending at `cuts`; return (content, calls, raw deltas)."""
    parser = get_tool_parser(parser_name)()
    previous, deltas = "", []
    for end in sorted(set(cuts) | {len(text)}):
        current = text[:end]
        delta = parser.extract_tool_calls_streaming(previous, current, current[len(previous):])
        previous = current
        if delta is not None:
            deltas.append(delta)
    final = parser.finish_streaming(text)
    if final is not None:
        deltas.append(final)
    content, names, args = "", {}, {}
    for delta in deltas:
        content += delta.content or ""
        for tc in delta.tool_calls:
            if tc.name is not None:
                # The name comes first, once, with an id, before any argument text.
                assert tc.index not in names and tc.id and tc.index == len(names)
                names[tc.index], args[tc.index] = tc.name, ""
            else:
                assert tc.index in names and tc.id is None
            args[tc.index] += tc.arguments or ""
    return content, [ToolCall(names[i], args[i]) for i in sorted(names)], deltas


HERMES_CASES = [
    # (text, expected calls, expected content)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     [ToolCall("get_weather", '{"city": "Paris"}')], None),
    ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"s": "x}{\\"]", "n": [1, {"k": null}]}}\n'
     '</tool_call>\n<tool_call>\n{"arguments": {}, "name": "b"}\n</tool_call>',
     [ToolCall("a", '{"s": "x}{\\"]", "n": [1, {"k": null}]}'), ToolCall("b", "{}")], "Let me check.\n"),
    ('<tool_call>{"name": "noargs"}</tool_call>', [ToolCall("noargs", "{}")], None),
    ('<tool_call>{"name": "wrapped", "arguments": "{\\"a\\": 1}"}</tool_call>', [ToolCall("wrapped", '{"a": 1}')], None),
    # Cut off before the closing brace and tag (max_tokens): the complete arguments still count.
    ('<tool_call>{"name": "cut", "arguments": {"a": [1, 2]}', [ToolCall("cut", '{"a": [1, 2]}')], None),
    ('<tool_call>{"name": "ünï", "arguments": {"t": "日本語 🙂"}}</tool_call>', [ToolCall("ünï", '{"t": "日本語 🙂"}')], None),
]


@pytest.mark.parametrize("text,calls,content", HERMES_CASES)
def test_hermes_extract_and_stream(text, calls, content):
    result = get_tool_parser("hermes")().extract_tool_calls(text)
    assert result.tools_called and result.tool_calls == calls and result.content == content
    for step in (1, 2, 5, 13, len(text)):
        streamed_content, streamed_calls, _ = stream("hermes", text, list(range(step, len(text), step)))
        assert streamed_calls == calls
        assert streamed_content == (content or "")


@pytest.mark.parametrize("text", [
    "Just an answer, no tools.",
    "a < b and <tool is not a tag",
    "",
])
def test_hermes_plain_text(text):
    result = get_tool_parser("hermes")().extract_tool_calls(text)
    assert not result.tools_called and result.tool_calls == [] and result.content == (text or None)
    content, calls, _ = stream("hermes", text, list(range(1, len(text))))
    assert calls == [] and content == text


def test_hermes_malformed_call_is_content():
    text = '<tool_call>{"name": "f", "arguments": {bad json}}</tool_call>'
    result = get_tool_parser("hermes")().extract_tool_calls(text)
    assert not result.tools_called and result.content == text


def test_hermes_holds_back_partial_tag():
    parser = get_tool_parser("hermes")()
    delta = parser.extract_tool_calls_streaming("", "Hi <tool_", "Hi <tool_")
    assert delta.content == "Hi "  # "<tool_" might open a tool call: held back
    delta = parser.extract_tool_calls_streaming("Hi <tool_", "Hi <tool_call>", "call>")
    assert delta is None


LLAMA_CASES = [
    ('{"name": "f", "parameters": {"a": 1}}', [ToolCall("f", '{"a": 1}')]),
    ('<|python_tag|>{"name": "f", "arguments": {"a": "}"}}; {"name": "g", "parameters": {}}',
     [ToolCall("f", '{"a": "}"}'), ToolCall("g", "{}")]),
    ('  {"name": "h", "parameters": {"deep": {"x": [1, [2, {"y": 3}]]}}}',
     [ToolCall("h", '{"deep": {"x": [1, [2, {"y": 3}]]}}')]),
]


@pytest.mark.parametrize("text,calls", LLAMA_CASES)
def test_llama3_json_extract_and_stream(text, calls):
    result = get_tool_parser("llama3_json")().extract_tool_calls(text)
    assert result.tools_called and result.tool_calls == calls and result.content is None
    for step in (1, 3, 8, len(text)):
        content, streamed, _ = stream("llama3_json", text, list(range(step, len(text), step)))
        assert streamed == calls and content == ""


@pytest.mark.parametrize("text", ["The answer is 4.", "Use {braces} like this", "<|python"])
def test_llama3_json_plain_text(text):
    result = get_tool_parser("llama3_json")().extract_tool_calls(text)
    assert not result.tools_called and result.content == text
    content, calls, _ = stream("llama3_json", text, list(range(1, len(text))))
    assert calls == [] and content == text


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(HERMES_CASES + [(t, c, None) for t, c in LLAMA_CASES]), data=st.data())
def test_any_chunking_gives_the_same_calls(case, data):
    text, calls, _ = case
    name = "hermes" if "tool_call" in text else "llama3_json"
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=max(1, len(text) - 1)), max_size=12))
    _, streamed, _ = stream(name, text, cuts)
    assert streamed == calls


def test_registry():
    assert get_tool_parser("hermes") is get_tool_parser("qwen")
    with pytest.raises(ValueError, match="unknown tool call parser"):
        get_tool_parser("nope")


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    {"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},  # Anthropic
    {"type": "function", "function": {"name": "ping"}},
]


def test_required_schema_shape():
    schema = required_tool_calls_params(TOOLS, parallel_tool_calls=False).json
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [v["properties"]["name"]["const"] for v in schema["items"]["anyOf"]]
    assert names == ["get_weather", "lookup", "ping"]
    assert "maxItems" not in required_tool_calls_params(TOOLS, parallel_tool_calls=True).json
    single = required_tool_calls_params(TOOLS[:1]).json
    assert single["items"]["properties"]["arguments"] == {"$ref": "#/$defs/tool_0"}


def test_refs_inside_tool_schemas_are_rebased():
    tool = {"name": "t", "parameters": {"$defs": {"n": {"type": "integer"}}, "type": "object",
                                         "properties": {"a": {"$ref": "#/$defs/n"}, "self": {"$ref": "#"}}}}
    schema = required_tool_calls_params([tool]).json
    props = schema["$defs"]["tool_0"]["properties"]
    assert props["a"]["$ref"] == "#/$defs/tool_0/$defs/n" and props["self"]["$ref"] == "#/$defs/tool_0"


def test_tool_choice_mapping():
    assert tool_choice_params(TOOLS, "auto") is None and tool_choice_params(TOOLS, "none") is None
    assert tool_choice_params(TOOLS, {"type": "auto"}) is None
    assert tool_choice_params(TOOLS, "required").json["type"] == "array"
    assert tool_choice_params(TOOLS, {"type": "any"}).json["type"] == "array"
    named = tool_choice_params(TOOLS, {"type": "function", "function": {"name": "get_weather"}})
    assert named.json == TOOLS[0]["function"]["parameters"]
    assert tool_choice_params(TOOLS, {"type": "tool", "name": "lookup"}).json == TOOLS[1]["input_schema"]
    assert named_tool_params(TOOLS, "ping").json == {"type": "object"}
    with pytest.raises(ValueError, match="not among the tools"):
        tool_choice_params(TOOLS, {"type": "function", "function": {"name": "missing"}})
    with pytest.raises(ValueError):
        tool_choice_params([], "required")
    with pytest.raises(ValueError):
        tool_choice_params(TOOLS, "sometimes")


def test_parse_forced_tool_calls():
    calls = parse_forced_tool_calls('[{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
                                    '{"name": "ping", "arguments": {}}]')
    assert calls == [ToolCall("get_weather", '{"city": "Oslo"}'), ToolCall("ping", "{}")]
    assert parse_forced_tool_calls('{"city": "Oslo"}', named="get_weather") == [
        ToolCall("get_weather", '{"city": "Oslo"}')]
    assert json.loads(parse_forced_tool_calls('[{"name": "x", "arguments": {"t": "é"}}]')[0].arguments) == {"t": "é"}
    with pytest.raises(ValueError, match="cut off"):
        parse_forced_tool_calls('[{"name": "get_weather", "argu')


FORCED_CASES = [
    (None, '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "ping", "arguments": {}}]',
     [ToolCall("get_weather", '{"city": "Oslo"}'), ToolCall("ping", "{}")]),
    (None, '[{"name": "x", "arguments": {"t": "é ]}", "n": [1, 2]}}]', [ToolCall("x", '{"t": "é ]}", "n": [1, 2]}')]),
    ("get_weather", '{"city": "Oslo", "days": [1, 2]}', [ToolCall("get_weather", '{"city": "Oslo", "days": [1, 2]}')]),
]


@pytest.mark.parametrize("named,text,calls", FORCED_CASES)
def test_forced_tool_calls_stream_like_non_streaming(named, text, calls):
    assert parse_forced_tool_calls(text, named=named) == calls
    for step in (1, 4, len(text)):
        parser = forced_tool_call_parser(named)
        previous, names, args = "", {}, {}
        for end in list(range(step, len(text), step)) + [len(text)]:
            delta = parser.extract_tool_calls_streaming(previous, text[:end], text[len(previous):end])
            previous = text[:end]
            for tc in (delta.tool_calls if delta else []):
                if tc.name is not None:
                    names[tc.index], args[tc.index] = tc.name, ""
                args[tc.index] += tc.arguments or ""
            if named is not None and delta is not None and end == step:
                assert delta.tool_calls[0].name == named  # the name goes out before any argument
        assert [ToolCall(names[i], args[i]) for i in sorted(names)] == calls
