"""Grammars that force tool calls: `tool_choice="required"` (OpenAI) / `"any"` (Anthropic) and a
named function. The model writes plain JSON under the constraint; the server turns it into
`tool_calls` with `parse_forced_tool_calls`, so the arguments always parse and match the schema.

- required: `[{"name": "<tool>", "arguments": {<that tool's parameters>}}, ...]`, at least one
  call; exactly one when `parallel_tool_calls` is false.
- named: the arguments object of that one function.
"""

from __future__ import annotations

from typing import Any

from tokenmill.entrypoints.tool_parsers.base import ToolCall, ToolParser
from tokenmill.entrypoints.tool_parsers.forced import NamedToolCallParser, RequiredToolCallParser
from tokenmill.sampling_params import StructuredOutputsParams

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def tool_name_and_schema(tool: dict) -> tuple[str, dict]:
    """(name, parameters schema) from an OpenAI tool `{"type": "function", "function": {...}}`, a
    flat `{"name", "parameters"}` or an Anthropic tool `{"name", "input_schema"}`."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError("each tool must have a function name")
    schema = fn.get("parameters", fn.get("input_schema"))
    if schema is None:
        schema = _ANY_OBJECT
    if not isinstance(schema, dict):
        raise ValueError(f"tool {fn['name']!r}: parameters must be a JSON schema object")
    return fn["name"], schema


def _rebase_refs(node: Any, base: str) -> Any:
    """Copy of a schema with its local `$ref`s ("#", "#/...") pointing under `base`, so the schema
    still resolves once nested inside a bigger one."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                out[key] = base + value[1:]
            else:
                out[key] = _rebase_refs(value, base)
        return out
    if isinstance(node, list):
        return [_rebase_refs(v, base) for v in node]
    return node


def _call_schema(name: str, arguments_schema: dict) -> dict:
    return {
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": arguments_schema},
        "required": ["name", "arguments"],
    }


def required_tool_calls_params(tools: list[dict], parallel_tool_calls: bool = True) -> StructuredOutputsParams:
    """Constraint for `tool_choice="required"`: a JSON array of calls to the given tools."""
    if not tools:
        raise ValueError('tool_choice "required" needs at least one tool')
    defs: dict[str, dict] = {}
    variants = []
    for i, tool in enumerate(tools):
        name, schema = tool_name_and_schema(tool)
        # Each tool's schema lives in root $defs so its own "#/..." refs keep resolving.
        key = f"tool_{i}"
        defs[key] = _rebase_refs(schema, f"#/$defs/{key}")
        variants.append(_call_schema(name, {"$ref": f"#/$defs/{key}"}))
    items = variants[0] if len(variants) == 1 else {"anyOf": variants}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1, "$defs": defs}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=schema)


def named_tool_params(tools: list[dict], name: str) -> StructuredOutputsParams:
    """Constraint for a named `tool_choice`: that function's arguments object."""
    for tool in tools:
        tool_name, schema = tool_name_and_schema(tool)
        if tool_name == name:
            return StructuredOutputsParams(json=schema)
    raise ValueError(f"tool_choice names {name!r}, which is not among the tools")


def tool_choice_params(
    tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool = True
) -> StructuredOutputsParams | None:
    """The constraint for an OpenAI or Anthropic `tool_choice`, or None when the model chooses.

    OpenAI: "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}.
    Anthropic: {"type": "auto" | "any" | "none"} | {"type": "tool", "name": ...}.
    """
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind == "function":
            return named_tool_params(tools or [], (tool_choice.get("function") or {}).get("name"))
        if kind == "tool":
            return named_tool_params(tools or [], tool_choice.get("name"))
        tool_choice = kind
    if tool_choice in (None, "none", "auto"):
        return None
    if tool_choice in ("required", "any"):
        return required_tool_calls_params(tools or [], parallel_tool_calls)
    raise ValueError(f"unsupported tool_choice {tool_choice!r}")


def parse_forced_tool_calls(text: str, named: str | None = None) -> list[ToolCall]:
    """Tool calls from output generated under these constraints (the non-streaming path; stream
    with `forced_tool_call_parser`, which yields the same arguments text).

    Args:
        text: the model's full output.
        named: the function name for a named tool_choice (the text is its arguments); None for
            "required" (the text is the array of calls).
    Raises:
        ValueError: no call is complete (only when generation stopped early, e.g. at
            max_tokens); calls completed before such a cut are returned.
    """
    result = forced_tool_call_parser(named).extract_tool_calls(text)
    if not result.tools_called:
        raise ValueError("the tool call was cut off before it was complete")
    return result.tool_calls


def forced_tool_call_parser(named: str | None = None) -> ToolParser:
    """A parser (one per response) for output forced by `tool_choice_params`."""
    return RequiredToolCallParser() if named is None else NamedToolCallParser(named)
