"""`json_cost`, the scan that bounds parsing work before pydantic holds the event loop: it never
undercounts, whatever strings (escaped quotes, backslashes, brackets and commas) hide."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.entrypoints.server.request_body import CONTAINER_COST, MAX_JSON_COST, json_cost, string_aware_cost

TRICKY = st.text(alphabet='ab,[]{}"\\:', max_size=12)
VALUES = st.recursive(st.none() | st.booleans() | st.integers() | TRICKY,
                      lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY, inner, max_size=4),
                      max_leaves=30)


def structure(value) -> tuple[int, int]:
    """(separators + weighted containers, strings) of a parsed JSON value."""
    if isinstance(value, (list, dict)):
        items = list(value.values()) if isinstance(value, dict) else value
        cost, strings = CONTAINER_COST + max(0, len(items) - 1), len(value) if isinstance(value, dict) else 0
        for item in items:
            c, s = structure(item)
            cost, strings = cost + c, strings + s
        return cost, strings
    return 0, isinstance(value, str)


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_the_string_aware_pass_counts_structure_outside_strings(value):
    cost, strings = structure(value)
    assert string_aware_cost(json.dumps(value).encode()) == cost + strings


@settings(max_examples=300, deadline=None)
@given(VALUES)
def test_the_quick_count_never_undercounts(value):
    raw = json.dumps(value).encode()
    assert json_cost(raw) >= structure(value)[0]


def test_bombs_are_over_budget_and_a_big_prompt_is_not():
    nested = json.dumps({"prompt": "a", "x": [json.loads("[" * 150 + "]" * 150)] * 25_000}).encode()
    assert json_cost(nested) > MAX_JSON_COST
    assert json_cost(json.dumps({"x": list(range(400_000))}).encode()) > MAX_JSON_COST
    code = 'def f(x): return [x[i] for i in range(10)] {a: b}, "q" \\\n' * 100_000
    assert json_cost(json.dumps({"prompt": code}).encode()) == CONTAINER_COST + 2  # {} and two strings
