"""Causal bf16 prefill attention on the CPU's AMX tile units (`cpu_flash_prefill.cpp`).

A fresh prompt's attention is most of a long prefill on the CPU (48% of a 1,500-token SmolLM2
prefill through SDPA's flash kernel, docs/perf-cpu.md). This kernel computes the same causal
attention with both products on the tile units, the query heads of a KV group as one matrix, the
diagonal tiles cut to the keys their rows can see, and the softmax in float32 vector passes; the
probabilities are rounded to bf16 before the value product, as SDPA's bf16 kernel does. The native
attention op (`cpu_paged_decode.cpp`'s layer step) calls it for every fresh bf16 prompt where it
is supported; elsewhere that op keeps SDPA.

Built with the other C++ CPU kernels by `cpu_extension.py`, and only where the compiler targets
AMX (the ISA inductor picks for the machine); the kernel asks Linux for the tile state once.
"""

from __future__ import annotations

import torch

from tokenmill.ops.cpu_extension import extension


def supported(head_dim: int) -> bool:
    """Whether the kernel runs here (built with AMX, tiles granted) for this head size (a multiple
    of 32, at most 256)."""
    ext = extension()
    return ext is not None and ext.flash_prefill_supported(head_dim)


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one prompt: q [T, heads, head_dim], k and v [T, kv_heads, head_dim], bf16,
    kv_heads dividing heads (each token's heads contiguous; other layouts are copied) -> [T, heads,
    head_dim] bf16."""
    return extension().flash_prefill(q, k, v, scale)
