"""Constrained decoding with xgrammar: compile a spec, track each request, mask the logits."""

from tokenmill.structured_output.compiler import GrammarCompiler, GrammarError, spec_key
from tokenmill.structured_output.manager import (
    StructuredOutputManager,
    apply_bitmask,
    constrained_rows,
)
from tokenmill.structured_output.matcher import RequestGrammar
from tokenmill.structured_output.reasoning_gate import ReasoningGate

__all__ = [
    "GrammarCompiler",
    "GrammarError",
    "ReasoningGate",
    "RequestGrammar",
    "StructuredOutputManager",
    "apply_bitmask",
    "constrained_rows",
    "spec_key",
]
