"""Reasoning parsers on outputs written in each model family's format, whole and streamed in
any chunking (hypothesis), and together with the tool parsers that read the answer after the
thinking.

The outputs are written as each family writes them (markers, the layout whitespace around them,
where the template leaves the opening marker); the prompts' tails are those the families' chat
templates render.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.entrypoints.reasoning import REASONING_PARSERS, Start, get_reasoning_parser
from tokenmill.entrypoints.server.output_parsing import OutputParser
from tokenmill.entrypoints.tool_parsers import ToolCall, get_tool_parser

R1_PROMPT = "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>\n"
V31_THINK = "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜><think>"
V31_NO_THINK = "<｜begin▁of▁sentence｜><｜User｜>What is 2+3?<｜Assistant｜></think>"
QWEN3_HYBRID = "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
QWEN3_OFF = QWEN3_HYBRID + "<think>\n\n</think>\n\n"
QWEN3_2507 = QWEN3_HYBRID + "<think>\n"
KIMI_PROMPT = "<|im_user|>user<|im_middle|>Weather in Paris?<|im_end|><|im_assistant|>assistant<|im_middle|>"
MINIMAX_PROMPT = "]~b]user\nHi<|im_end|>\n]~b]ai\n<think>\n"

# (parser, prompt, output, expected thinking, expected answer)
CASES = [
    ("deepseek_r1", R1_PROMPT, "Okay, the user asks for 2+3. That is 5.\n</think>\n\nThe answer is **5**.",
     "Okay, the user asks for 2+3. That is 5.", "The answer is **5**."),
    # The original R1 template left the opening to the model.
    ("deepseek_r1", "<｜User｜>What is 2+3?<｜Assistant｜>", "<think>\nAdd them: 5.\n</think>\n\n5",
     "Add them: 5.", "5"),
    # Cut off by max_tokens while thinking: all of it is thinking.
    ("deepseek_r1", R1_PROMPT, "Let me think about this carefully, first", "Let me think about this carefully, first",
     None),
    ("deepseek_v3", V31_THINK, "Simple sum.</think>2 + 3 = 5", "Simple sum.", "2 + 3 = 5"),
    ("deepseek_v3", V31_NO_THINK, "2 + 3 = 5", None, "2 + 3 = 5"),
    ("qwen3", QWEN3_HYBRID, "<think>\nThe user asks about France's capital. It is Paris.\n</think>\n\nThe capital "
     "of France is Paris.", "The user asks about France's capital. It is Paris.", "The capital of France is Paris."),
    ("qwen3", QWEN3_OFF, "The capital of France is Paris.", None, "The capital of France is Paris."),
    # A hybrid model may answer without thinking; a `<` that starts no marker is answer text.
    ("qwen3", QWEN3_HYBRID, "Paris.", None, "Paris."),
    ("qwen3", QWEN3_HYBRID, "<b>Paris</b>", None, "<b>Paris</b>"),
    ("qwen3", QWEN3_2507, "Okay, France... Paris.\n</think>\n\nParis.", "Okay, France... Paris.", "Paris."),
    # "</think>" inside the answer is answer text: the thinking ended at the first one.
    ("qwen3", QWEN3_2507, "a < b\n</think>\n\nUse </think> to close.", "a < b", "Use </think> to close."),
    ("kimi_k2", KIMI_PROMPT, "<think>The user wants the weather in Paris.</think>Let me check that for you.",
     "The user wants the weather in Paris.", "Let me check that for you."),
    # Kimi-K2 opens its tool-call section straight from the thinking: that ends the thinking.
    ("kimi_k2", KIMI_PROMPT, "<think>I need the weather tool<|tool_calls_section_begin|><|tool_call_begin|>"
     "functions.get_weather:0<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|>"
     "<|tool_calls_section_end|>", "I need the weather tool",
     "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>"
     "{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>"),
    ("kimi_k2", KIMI_PROMPT, "Hello! How can I help?", None, "Hello! How can I help?"),
    ("minimax_m2", MINIMAX_PROMPT, "The user greets me. I should greet back.\n</think>\n\nHello! How can I help?",
     "The user greets me. I should greet back.", "Hello! How can I help?"),
    # The append-think form keeps the thinking in the answer, reopened with <think>.
    ("minimax_m2_append_think", MINIMAX_PROMPT, "The user greets me.\n</think>\n\nHello!", None,
     "<think>The user greets me.\n</think>\n\nHello!"),
]


def streamed(name: str, prompt: str, text: str, cuts: list[int]) -> tuple[str, str]:
    parser = get_reasoning_parser(name).for_prompt(prompt)
    reasoning = content = ""
    for end in sorted(set(cuts) | {len(text)}):
        delta = parser.stream(text[:end])
        if delta is not None:
            reasoning += delta.reasoning or ""
            content += delta.content or ""
    final = parser.stream(text, final=True)
    if final is not None:
        reasoning += final.reasoning or ""
        content += final.content or ""
    return reasoning, content


@pytest.mark.parametrize("name,prompt,text,reasoning,content", CASES)
def test_extract_and_stream(name, prompt, text, reasoning, content):
    parser = get_reasoning_parser(name).for_prompt(prompt)
    assert parser.extract_reasoning(text) == (reasoning, content)
    for step in (1, 2, 7, len(text)):
        assert streamed(name, prompt, text, list(range(step, len(text), step))) == (reasoning or "", content or "")


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), data=st.data())
def test_any_chunking_adds_up_to_the_whole(case, data):
    name, prompt, text, reasoning, content = case
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=max(1, len(text) - 1)), max_size=20))
    assert streamed(name, prompt, text, cuts) == (reasoning or "", content or "")


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab <>/thinkn\n")), max_size=40), data=st.data(),
       name=st.sampled_from(sorted(REASONING_PARSERS)), start=st.sampled_from(list(Start)))
def test_streamed_pieces_never_take_anything_back(text, data, name, start):
    """On arbitrary text full of marker fragments, streaming still adds up to the whole."""
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=max(1, len(text))), max_size=10))
    parser = get_reasoning_parser(name)(start)
    whole = get_reasoning_parser(name)(start).split(text, final=True)
    reasoning = content = ""
    for end in sorted(set(cuts)):
        delta = parser.stream(text[:end])
        if delta is not None:
            reasoning, content = reasoning + (delta.reasoning or ""), content + (delta.content or "")
    final = parser.stream(text, final=True)
    if final is not None:
        reasoning, content = reasoning + (final.reasoning or ""), content + (final.content or "")
    assert (reasoning, content) == whole


@pytest.mark.parametrize("prompt,start", [
    (QWEN3_HYBRID, Start.UNDECIDED), (QWEN3_OFF, Start.ANSWER), (QWEN3_2507, Start.THINKING),
    (V31_THINK, Start.THINKING), (V31_NO_THINK, Start.ANSWER), (None, Start.UNDECIDED),
])
def test_start_follows_the_prompt_tail(prompt, start):
    assert get_reasoning_parser("qwen3").start_for_prompt(prompt) == start


def test_families_that_always_think():
    # R1 and MiniMax-M2 open the thinking in their templates: an undecided tail still thinks.
    assert get_reasoning_parser("deepseek_r1").start_for_prompt("no markers") == Start.THINKING
    assert get_reasoning_parser("minimax_m2").start_for_prompt("no markers") == Start.THINKING
    assert get_reasoning_parser("minimax_m2").start_for_prompt("x</think>\n") == Start.ANSWER


def test_partial_markers_are_held_back():
    parser = get_reasoning_parser("qwen3").for_prompt(QWEN3_HYBRID)
    assert parser.stream("<thi") is None  # may still open the thinking
    assert parser.stream("<think>\nPar").reasoning == "Par"
    assert parser.stream("<think>\nParis\n</th") .reasoning == "is"  # "\n</th" may close it
    delta = parser.stream("<think>\nParis\n</think>\n\nIt is")
    assert delta.reasoning is None and delta.content == "It is"


def test_registry():
    assert set(REASONING_PARSERS) >= {"deepseek_r1", "qwen3", "kimi_k2", "minimax_m2", "minimax_m2_append_think"}
    with pytest.raises(ValueError, match="unknown reasoning parser"):
        get_reasoning_parser("nope")


# Thinking, then a tool call in the family's own format: the tool parser reads the answer.
TOOL_CASES = [
    ("qwen3", "hermes", QWEN3_HYBRID,
     "<think>\nI should look up the weather.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
     "{\"city\": \"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"get_time\", \"arguments\": {\"tz\": \"CET\"}}\n"
     "</tool_call>",
     "I should look up the weather.", None,
     [ToolCall("get_weather", '{"city": "Paris"}'), ToolCall("get_time", '{"tz": "CET"}')]),
    ("deepseek_r1", "deepseek_v3", R1_PROMPT,
     "Need the weather tool.\n</think>\n\n<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
     "```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
     "Need the weather tool.", None, [ToolCall("get_weather", '{"city": "Paris"}')]),
    ("kimi_k2", "kimi_k2", KIMI_PROMPT,
     "<think>Use the tool.</think>Checking.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
     "<|tool_call_argument_begin|>{\"city\": \"Paris\"}<|tool_call_end|><|tool_calls_section_end|>",
     "Use the tool.", "Checking.", [ToolCall("get_weather", '{"city": "Paris"}', "functions.get_weather:0")]),
    ("minimax_m2", "minimax_m2", MINIMAX_PROMPT,
     "Call the tool.\n</think>\n\n<minimax:tool_call>\n<invoke name=\"get_weather\">\n<parameter name=\"city\">"
     "Paris</parameter>\n<parameter name=\"days\">3</parameter>\n</invoke>\n</minimax:tool_call>",
     "Call the tool.", None, [ToolCall("get_weather", '{"city": "Paris", "days": 3}')]),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]


def _stream_output(parser: OutputParser, text: str, cuts: list[int]):
    reasoning = content = ""
    names: dict[int, str] = {}
    args: dict[int, str] = {}
    ids: dict[int, str] = {}
    previous = 0
    for end in sorted(set(cuts) | {len(text)}):
        delta = parser.feed(text[previous:end])
        previous = end
        reasoning, content = reasoning + (delta.reasoning or ""), content + (delta.content or "")
        for t in delta.tool_calls:
            if t.name is not None:
                names[t.index], args[t.index], ids[t.index] = t.name, "", t.id
            args[t.index] += t.arguments or ""
        assert len({t.index for t in delta.tool_calls}) == len(delta.tool_calls)  # each call once per delta
    delta = parser.finish()
    reasoning, content = reasoning + (delta.reasoning or ""), content + (delta.content or "")
    for t in delta.tool_calls:
        if t.name is not None:
            names[t.index], args[t.index], ids[t.index] = t.name, "", t.id
        args[t.index] += t.arguments or ""
    return reasoning, content, [ToolCall(names[i], args[i], ids[i]) for i in sorted(names)]


@pytest.mark.parametrize("reasoning_name,tool_name,prompt,text,reasoning,content,calls", TOOL_CASES)
def test_thinking_then_tool_calls(reasoning_name, tool_name, prompt, text, reasoning, content, calls):
    def parser() -> OutputParser:
        return OutputParser(get_reasoning_parser(reasoning_name).for_prompt(prompt), get_tool_parser(tool_name)(TOOLS))

    parsed = parser().parse(text)
    assert (parsed.reasoning, parsed.content) == (reasoning, content)
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [(c.name, c.arguments) for c in calls]
    assert [c.id for c in parsed.tool_calls] == [c.id for c in calls]
    for step in (1, 3, 11, len(text)):
        r, c, streamed_calls = _stream_output(parser(), text, list(range(step, len(text), step)))
        assert (r, c) == (reasoning, content or "")
        assert [(t.name, t.arguments) for t in streamed_calls] == [(t.name, t.arguments) for t in calls]
        if calls[0].id is not None:  # the model's own ids go out as the call ids
            assert [t.id for t in streamed_calls] == [t.id for t in calls]


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(TOOL_CASES), data=st.data())
def test_thinking_then_tool_calls_any_chunking(case, data):
    reasoning_name, tool_name, prompt, text, reasoning, content, calls = case
    cuts = data.draw(st.lists(st.integers(min_value=1, max_value=len(text) - 1), max_size=25))
    parser = OutputParser(get_reasoning_parser(reasoning_name).for_prompt(prompt), get_tool_parser(tool_name)(TOOLS))
    r, c, streamed_calls = _stream_output(parser, text, cuts)
    assert (r, c) == (reasoning, content or "")
    assert [(t.name, t.arguments) for t in streamed_calls] == [(t.name, t.arguments) for t in calls]
