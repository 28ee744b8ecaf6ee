"""Refusing, at start and in one line, a config field that changes the math in a way a model
family does not implement (never ignoring it)."""

from __future__ import annotations

from typing import Any


def refuse_unless(supported: bool, config: Any, field: str, why: str) -> None:
    """Raise `ValueError` naming `field` and its value unless `supported`."""
    if not supported:
        arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
        raise ValueError(f"{arch}: {field}={getattr(config, field, None)!r} is not supported ({why})")
