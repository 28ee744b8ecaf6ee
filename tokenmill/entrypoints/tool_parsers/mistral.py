"""Mistral formats, after the `[TOOL_CALLS]` token:

- tokenizer v3-v10 (Mistral 7B v0.3, Nemo, Small 3.1): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- v11 and later (Small 3.2, Magistral, Devstral): `[TOOL_CALLS]NAME{ARGS}` per call, or
  `[TOOL_CALLS]NAME[ARGS]{ARGS}` (v13), optionally with `[CALL_ID]ID` before `[ARGS]`.

Mistral's templates accept only 9-character alphanumeric call ids, so those are what this parser
hands out.
"""

from __future__ import annotations

import secrets
import string

from tokenmill.entrypoints.tool_parsers.base import CallText, ToolParser, held_suffix
from tokenmill.entrypoints.tool_parsers.json_text import json_arguments, json_call, scan_json_value, skip_ws

BOT, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
_ALPHANUMERIC = string.ascii_letters + string.digits


class MistralToolParser(ToolParser):
    name = "mistral"
    markers = (BOT, ARGS, CALL_ID)

    def new_call_id(self) -> str:
        return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(9))

    def _split(self, text: str, final: bool) -> tuple[str, list[CallText]]:
        first = text.find(BOT)
        if first < 0:
            held = 0 if final else held_suffix(text, BOT)
            return text[: len(text) - held], []
        after = skip_ws(text, first + len(BOT))
        if after < len(text) and text[after] == "[" and not text.startswith(ARGS, after) \
                and not text.startswith(CALL_ID, after):
            return text[:first], _array_calls(text, after)
        pieces = text[first + len(BOT):].split(BOT)
        return text[:first], [_named_call(piece) for piece in pieces]


def _array_calls(text: str, start: int) -> list[CallText]:
    calls, i = [], start + 1
    while True:
        i = skip_ws(text, i)
        if i < len(text) and text[i] == ",":
            i += 1
            continue
        if i >= len(text) or text[i] != "{":
            return calls
        end = scan_json_value(text, i)
        calls.append(json_call(text[i:] if end is None else text[i:end]))
        if end is None:
            return calls
        i = end


def _named_call(piece: str) -> CallText:
    """`NAME{...}`, `NAME[ARGS]{...}` or `NAME[CALL_ID]ID[ARGS]{...}`; the name ends where a
    marker or the arguments begin."""
    cut = [i for i in (piece.find("{"), piece.find("[")) if i >= 0]
    if not cut:
        return CallText(None, "", False)
    end = min(cut)
    name = piece[:end].strip()
    rest = piece[end:]
    if rest.startswith("["):
        args = rest.find(ARGS)
        if args < 0:
            # The name is held back until [ARGS]: a [CALL_ID] before it brings the model's own id,
            # which must go out with the name.
            return CallText(None, "", False)
        call_id = rest[len(CALL_ID):args].strip() if rest.startswith(CALL_ID) else None
        return json_arguments(name or None, rest, args + len(ARGS), call_id=call_id or None)
    return json_arguments(name or None, rest, 0)
