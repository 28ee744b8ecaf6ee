"""MiniMax-M2 format: XML inside `<minimax:tool_call>...</minimax:tool_call>`, one `<invoke>` per
call (several for parallel calls), each argument a `<parameter>` whose text is the value:

    <minimax:tool_call>
    <invoke name="get_weather">
    <parameter name="city">Paris</parameter>
    <parameter name="days">3</parameter>
    </invoke>
    </minimax:tool_call>

Values are text, so each is read back as the type the tool's schema gives its parameter (integer,
number, boolean, object/array as JSON; string otherwise). Arguments stream one complete parameter
at a time: `{"city": "Paris"`, then `, "days": 3`, then `}` when the invoke closes, which adds up to
the `json.dumps` of the whole object that the non-streaming parse returns.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tokenmill.entrypoints.tool_parsers.base import CallText, ToolParser, held_suffix

BEGIN, END = "<minimax:tool_call>", "</minimax:tool_call>"
INVOKE_END, PARAM_END = "</invoke>", "</parameter>"
_INVOKE = re.compile(r"<invoke name=([\"']?)([^\"'>]*)\1>")
_PARAM = re.compile(r"<parameter name=([\"']?)([^\"'>]*)\1>(.*?)</parameter>", re.DOTALL)


class MiniMaxM2ToolParser(ToolParser):
    name = "minimax_m2"
    markers = (BEGIN, END)

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        first = text.find(BEGIN)
        if first < 0:
            held = 0 if final else held_suffix(text, BEGIN)
            return text[: len(text) - held], []
        calls = []
        for match in _INVOKE.finditer(text, first):
            end = text.find(INVOKE_END, match.end())
            body = text[match.end():] if end < 0 else text[match.end():end]
            name = match.group(2).strip()
            types = self._parameter_schemas(name)
            items = [f"{json.dumps(p.group(2).strip(), ensure_ascii=False)}: "
                     f"{json.dumps(_typed(p.group(3), types.get(p.group(2).strip())), ensure_ascii=False)}"
                     for p in _PARAM.finditer(body)]
            arguments = "{" + ", ".join(items) + ("}" if end >= 0 else "")
            calls.append(CallText(name, arguments, end >= 0))
        return text[:first], calls

    def _parameter_schemas(self, function_name: str) -> dict[str, Any]:
        for tool in self.tools:
            fn = tool.get("function", tool)
            if fn.get("name") == function_name:
                params = fn.get("parameters") or {}
                props = params.get("properties") if isinstance(params, dict) else None
                return props if isinstance(props, dict) else {}
        return {}


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, dict):
        return set()
    kind = schema.get("type")
    types = {kind} if isinstance(kind, str) else {t for t in kind if isinstance(t, str)} \
        if isinstance(kind, list) else set()
    for key in ("anyOf", "oneOf", "allOf"):
        for option in schema.get(key) or []:
            types |= _schema_types(option)
    return types


def _typed(raw: str, schema: Any) -> Any:
    """A parameter's text as the value its schema describes; text that fits no declared type
    stays a string (what the model wrote is never dropped)."""
    value = raw.strip()
    types = _schema_types(schema)
    if "null" in types and value.lower() in ("null", "none"):
        return None
    if "integer" in types:
        try:
            return int(value)
        except ValueError:
            pass
    if "number" in types:
        try:
            number = float(value)
            return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number
        except ValueError:
            pass
    if "boolean" in types and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if types & {"object", "array"} or not types:
        try:
            parsed = json.loads(value)
            if types or isinstance(parsed, (dict, list)):
                return parsed
        except (json.JSONDecodeError, RecursionError):
            pass
    return value
