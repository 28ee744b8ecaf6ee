"""Quantised linear methods, chosen per layer when it is built from the model's quantisation
(`config/quantization.py`, in the build context): `linear_method()` is what every linear layer
multiplies with. fp8 methods live in `fp8.py`; `not_converted.py` returns the layers a checkpoint
keeps unquantised (`modules_to_not_convert`) to the plain method once their names are known."""

from __future__ import annotations

from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear_method import LinearMethod, unquantized_linear_method


def linear_method() -> LinearMethod:
    """The method of a linear layer built now: the model's quantisation, on this device."""
    context = build_context()
    if context.quantization is None:
        return unquantized_linear_method()
    from tokenmill.model.layers.quantization.fp8 import fp8_linear_method
    return fp8_linear_method(context.quantization, context)
