"""Fifty varied JSON schemas (nested objects, arrays, enums, bounded numbers, required fields,
$ref, anyOf, patterns, nullable types) shared by the structured-output tests."""

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
AGE = {"type": "integer", "minimum": 0, "maximum": 130}
SCORE = {"type": "number", "minimum": -1.5, "maximum": 2.25}
COLOR = {"enum": ["red", "green", "blue"]}
TAGS = {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}
POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer", "minimum": -100, "maximum": 100}, "y": {"type": "integer"}},
    "required": ["x", "y"],
}

BASE_SCHEMAS = [
    {"type": "object", "properties": {"name": NAME}, "required": ["name"]},
    {"type": "object", "properties": {"name": NAME, "age": AGE}, "required": ["name", "age"]},
    {"type": "object", "properties": {"age": AGE, "score": SCORE}, "required": ["score"]},
    {"type": "object", "properties": {"color": COLOR}, "required": ["color"]},
    {"type": "object", "properties": {"tags": TAGS}, "required": ["tags"]},
    {"type": "object", "properties": {"p": POINT, "q": POINT}, "required": ["p", "q"]},
    {"type": "array", "items": POINT, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    {"type": "boolean"},
    {"type": "null"},
    {"enum": ["yes", "no", "maybe", 1, None]},
    {"const": "fixed"},
    {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
    {"type": "string", "minLength": 3, "maxLength": 5},
    {"type": ["string", "null"], "maxLength": 6},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 5}, {"type": "string", "maxLength": 4}]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "object",
        "properties": {"c": AGE}, "required": ["c"]}}, "required": ["b"]}}, "required": ["a"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "string", "maxLength": 10}},
     "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1}, "kind": {"enum": ["a", "b"]},
        "meta": {"type": "object", "properties": {"v": SCORE}}}, "required": ["id", "kind"]},
    {"$defs": {"pt": POINT}, "type": "object", "properties": {"from": {"$ref": "#/$defs/pt"},
        "to": {"$ref": "#/$defs/pt"}}, "required": ["from", "to"]},
    {"type": "object", "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[a-z]{3}$"},
        "qty": {"type": "integer", "minimum": 1, "maximum": 5}}, "required": ["sku", "qty"]}}},
     "required": ["items"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}, "level": {
        "type": "integer", "enum": [1, 2, 3]}}, "required": ["level"]},
]


def _wrapped(schema: dict) -> dict:
    """A second, harder variant of each base schema: nested in an object with a sibling list."""
    inner = dict(schema)
    defs = inner.pop("$defs", None)  # "#/$defs/..." refs resolve against the root
    wrapped = {
        "type": "object",
        "properties": {"data": inner, "count": {"type": "integer", "minimum": 0, "maximum": 3},
                       "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}},
        "required": ["data", "count"],
    }
    if defs:
        wrapped["$defs"] = defs
    return wrapped


SCHEMAS = BASE_SCHEMAS + [_wrapped(s) for s in BASE_SCHEMAS]
assert len(SCHEMAS) == 50
