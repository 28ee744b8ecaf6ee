"""Compile a `StructuredOutputsParams` into an xgrammar grammar, once per distinct spec.

Compilation costs milliseconds to seconds (long `maxLength` bounds, deep nesting), so compiled
grammars are kept in a bounded LRU cache keyed by the canonical spec. Both bounds (entries and
bytes) matter: a flood of distinct schemas must not grow memory without limit (docs/reliability.md 28),
and one huge grammar must not push everything else out for nothing.

Every user error comes out as `GrammarError(ValueError)` with a short message built from the
parser's own reason, with xgrammar's timestamp / source-path prefix stripped (docs/reliability.md 29).
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict

import xgrammar as xgr

from tokenmill.sampling_params import StructuredOutputsParams

# Far above any real schema or grammar; refuses "compile this 10 MB spec" before xgrammar sees it.
DEFAULT_MAX_SPEC_CHARS = 64 * 1024
# Nesting of the schema document (objects and lists). Compile time grows steeply with depth
# (measured: 600 levels ~2.5 s, 1800 levels ~80 s), and real schemas stay far below this.
MAX_SCHEMA_DEPTH = 64
DEFAULT_MAX_CACHE_ENTRIES = 512
DEFAULT_MAX_CACHE_BYTES = 256 * 1024 * 1024
# Bound on the reason we echo back to the client.
_MAX_REASON_CHARS = 240

# xgrammar 0.2's JSON-schema converter writes the characters of a string with length bounds as
# [^"\\\r\n], which lets raw control characters (tab, \x00-\x1f) into a JSON string: invalid JSON
# that strict parsers (Python's json, JavaScript's JSON.parse) reject. Its unbounded strings already
# use the strict class; this is the same rewrite for the bounded ones.
_LAX_STRING_CHAR = r'[^\"\\\r\n]'
_STRICT_STRING_CHAR = r'[^\0-\x1f\"\\\r\n]'

# xgrammar errors look like "[04:40:10] /project/cpp/json_schema_converter.cc:4944: <reason>".
_XGR_PREFIX = re.compile(r"^\s*(\[[0-9:]+\]\s*)?[^\s:]+\.(cc|h|cpp|py):\d+:\s*")
_CHECK_FAILED = re.compile(r"Check failed: \(.*?\) is false:\s*")


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled (the server answers 400 with `str(e)`)."""


def _clean_reason(exc: BaseException) -> str:
    """The parser's reason without log prefixes, source paths or the echoed input."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = _CHECK_FAILED.sub("", _XGR_PREFIX.sub("", text))
    # The JSON parser echoes the whole input after this marker; the client already has it.
    text = text.split(" The JSON string is:", 1)[0].strip()
    if "/" in text and re.search(r"/\w+/\w+\.(cc|h|cpp|py)\b", text):
        return "the grammar engine rejected it"
    if len(text) > _MAX_REASON_CHARS:
        text = text[: _MAX_REASON_CHARS - 3] + "..."
    return text or "the grammar engine rejected it"


def spec_key(params: StructuredOutputsParams) -> tuple[str, str]:
    """Canonical cache key: (kind, text). A schema given as a dict or as its JSON text shares a key.

    JSON keys keep their order: xgrammar emits object properties in declared order, so two
    schemas that differ only in order are different grammars.
    """
    if params.json is not None:
        schema = params.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (json.JSONDecodeError, RecursionError) as e:
                reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
                raise GrammarError(f"structured_outputs.json is not valid JSON: {reason}") from None
        if not isinstance(schema, (dict, bool)):
            raise GrammarError("structured_outputs.json must be a JSON schema object")
        if _nesting_depth(schema) > MAX_SCHEMA_DEPTH:
            raise GrammarError(
                f"structured_outputs.json is nested more than {MAX_SCHEMA_DEPTH} levels deep"
            )
        try:
            text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            raise GrammarError("structured_outputs.json is not a serializable JSON schema") from None
        return "json", text
    if params.json_object:
        return "json_object", ""
    if params.regex is not None:
        return "regex", params.regex
    if params.choice is not None:
        if any(not isinstance(c, str) for c in params.choice):
            raise GrammarError("structured_outputs.choice must be a list of strings")
        # Keep order and duplicates out of the key's meaning: the grammar is the same set.
        return "choice", json.dumps(sorted(set(params.choice)), ensure_ascii=False)
    if params.grammar is not None:
        return "grammar", params.grammar
    raise GrammarError("structured_outputs sets no constraint")


def _nesting_depth(value: object) -> int:
    """Deepest nesting of dicts and lists, without recursion (the input is untrusted)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_SCHEMA_DEPTH:  # deeper is already over the limit; stop walking there
            stack.extend((child, depth + 1) for child in node)
    return deepest


def choice_ebnf(choices: list[str]) -> str:
    """EBNF accepting exactly one of the strings.

    JSON string literals are valid EBNF literals in xgrammar (same escapes: \\" \\\\ \\n \\uXXXX),
    so `json.dumps` does the quoting.
    """
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class GrammarCompiler:
    """Thread-safe, cached compilation of structured-output specs for one tokenizer.

    Args:
        tokenizer_info: xgrammar's view of the vocabulary (mask width = its `vocab_size`).
        max_cache_entries / max_cache_bytes: LRU bounds; the least recently used grammar goes first.
        max_spec_chars: longest schema / regex / grammar text accepted.
        max_threads: xgrammar compile threads (the CPU is shared with the model).
    """

    def __init__(
        self,
        tokenizer_info: xgr.TokenizerInfo,
        *,
        max_cache_entries: int = DEFAULT_MAX_CACHE_ENTRIES,
        max_cache_bytes: int = DEFAULT_MAX_CACHE_BYTES,
        max_spec_chars: int = DEFAULT_MAX_SPEC_CHARS,
        max_threads: int = 2,
    ) -> None:
        assert max_cache_entries >= 1 and max_cache_bytes >= 1 and max_spec_chars >= 1
        self.tokenizer_info = tokenizer_info
        self.max_cache_entries = max_cache_entries
        self.max_cache_bytes = max_cache_bytes
        self.max_spec_chars = max_spec_chars
        # xgrammar's own cache is off: this class owns the only cache, so its bounds are the bounds.
        self._xgr = xgr.GrammarCompiler(tokenizer_info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], xgr.CompiledGrammar] = OrderedDict()
        self._cache_bytes = 0
        self._lock = threading.Lock()
        self.num_hits = 0
        self.num_misses = 0

    @property
    def cache_entries(self) -> int:
        return len(self._cache)

    @property
    def cache_bytes(self) -> int:
        return self._cache_bytes

    def compile(self, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """The compiled grammar for `params`; raises `GrammarError` (a ValueError) if invalid."""
        key = spec_key(params)
        if len(key[1]) > self.max_spec_chars:
            raise GrammarError(
                f"structured_outputs.{key[0]} is {len(key[1])} characters; the limit is "
                f"{self.max_spec_chars}"
            )
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.num_hits += 1
                return compiled
            self.num_misses += 1
        # Compile outside the lock: a slow schema must not block cache hits of other requests.
        # Two threads compiling the same new key both succeed; the second insert is dropped.
        compiled = self._compile_uncached(key)
        self._insert(key, compiled)
        return compiled

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()
            self._cache_bytes = 0

    def _compile_uncached(self, key: tuple[str, str]) -> xgr.CompiledGrammar:
        kind, text = key
        try:
            if kind == "json":
                # One canonical layout ('{"a": 1, "b": [2]}'): unbounded whitespace lets small
                # models loop on newlines forever, and it buys the client nothing.
                return self._compile_json_schema(text)
            if kind == "json_object":
                return self._xgr.compile_json_schema('{"type":"object"}', any_whitespace=False)
            if kind == "regex":
                return self._xgr.compile_regex(text)
            if kind == "choice":
                return self._xgr.compile_grammar(choice_ebnf(json.loads(text)))
            if kind == "grammar":
                return self._xgr.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError, RecursionError) as e:
            raise GrammarError(f"invalid structured_outputs.{kind}: {_clean_reason(e)}") from None
        raise AssertionError(f"unknown spec kind {kind}")

    def _compile_json_schema(self, schema_text: str) -> xgr.CompiledGrammar:
        grammar = xgr.Grammar.from_json_schema(schema_text, any_whitespace=False)
        ebnf = str(grammar)
        strict = ebnf.replace(_LAX_STRING_CHAR, _STRICT_STRING_CHAR)
        if strict == ebnf:
            return self._xgr.compile_grammar(grammar)
        # The printed grammar is xgrammar's own EBNF and parses back to the same grammar.
        return self._xgr.compile_grammar(strict)

    def _insert(self, key: tuple[str, str], compiled: xgr.CompiledGrammar) -> None:
        size = int(compiled.memory_size_bytes)
        if size > self.max_cache_bytes:
            return  # would evict everything and still not fit; the caller keeps its own reference
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return
            self._cache[key] = compiled
            self._cache_bytes += size
            while len(self._cache) > self.max_cache_entries or self._cache_bytes > self.max_cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cache_bytes -= int(old.memory_size_bytes)
            assert self._cache_bytes >= 0
