"""Per-request parameters of an embedding (pooling) request (vLLM's `PoolingParams`)."""

from __future__ import annotations

import msgspec


class PoolingParams(msgspec.Struct, omit_defaults=True, frozen=True, gc=False):
    """`dimensions`: keep this many leading components and L2-normalise again (Matryoshka models)."""

    dimensions: int | None = None
