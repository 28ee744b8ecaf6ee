"""Paged decode attention on the CPU with the cache read in place (`cpu_paged_decode.cpp`).

The gather + SDPA path of `model/attention/cpu.py` copies every decoding request's blocks out of
the cache before attending (a memory-bound copy of all K and V each layer); this kernel walks the
block table instead, one task per (request, KV head) or, at batch, per request (whole cache rows
read front to back), the query heads of a group together. At SmolLM2-135M's shape, each call
reading the next of 30 layers' caches from memory, 2 threads, Zen 4: batch 32 with 64-192 tokens
of context 0.22 ms a layer against 1.12 for gather + SDPA, one request 7 against 70 us (`python -m
tokenmill.benchmarks.kernels.cpu_paged_decode --layers 30`, 2026-12-07).

Built with the other C++ CPU kernels by `cpu_extension.py`; where the build fails the CPU
backend keeps gather + SDPA.
"""

from __future__ import annotations

import torch

from tokenmill.ops.cpu_extension import extension


def supports(head_dim: int) -> bool:
    """Whether the kernel serves this head size on this machine (builds it on first use). It takes
    q and the cache in bfloat16, float16 or float32, the same for both; heads of up to 32 vectors."""
    ext = extension()
    return ext is not None and head_dim % ext.vector_width() == 0 and head_dim <= 32 * ext.vector_width()


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] against each request's `seq_lens[i]` tokens in the cache
    [blocks, block_size, kv_heads, head_dim] through `block_table` rows; [B, heads, head_dim]."""
    return extension().paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)
