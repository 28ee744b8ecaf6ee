"""How the current forward pass runs, for the few kernel choices that depend on it.

The runner opens `forward_context(...)` around every model call. Today one fact lives here:
whether the pass is a CUDA-graph capture (or the warm-up just before one) of a decode batch, where
one-row products run the Triton GEMV (`model/layers/linear_method.py`): in a graph its launch cost
is gone and it reads weights faster than cuBLAS; eagerly, cuBLAS's cheaper launch wins. Per-step
data (attention metadata, positions) is passed to `forward` explicitly, never through here.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class ForwardContext:
    decode_graph: bool = False  # capturing (or warming up for) a decode CUDA graph


_current: ContextVar[ForwardContext | None] = ContextVar("tokenmill_forward_context", default=None)


@contextlib.contextmanager
def forward_context(context: ForwardContext) -> Iterator[ForwardContext]:
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)


def current_forward_context() -> ForwardContext:
    context = _current.get()
    if context is None:
        raise RuntimeError("model forward passes run inside model.forward_context.forward_context(...) "
                           "(the model runner opens it)")
    return context
