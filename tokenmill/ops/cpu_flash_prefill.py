"""Causal bf16 prefill attention on the CPU (`cpu_flash_prefill.cpp`): both products on the AMX
tile units where the CPU has them, else as AVX512-BF16 dot products (AMD Zen 4, Intel before AMX).

A fresh prompt's attention is most of a long prefill on the CPU (48% of a 1,500-token SmolLM2
prefill through SDPA's flash kernel on an AMX Xeon, 46% on a Zen 4 EPYC; docs/perf-cpu.md). This
kernel computes the same causal attention with the query heads of a KV group as one matrix, the
diagonal blocks cut to the keys their rows can see, and the softmax in float32 vector passes; the
probabilities are rounded to bf16 before the value product, as SDPA's bf16 kernel does. The native
attention op (`cpu_paged_decode.cpp`'s layer step) calls it for every fresh bf16 prompt where it
is supported; elsewhere that op keeps SDPA.

Built with the other C++ CPU kernels by `cpu_extension.py` where the build targets AVX-512; the tile
path only where the compiler also targets AMX (the ISA inductor picks for the machine; the kernel
asks Linux for the tile state once), the dot-product path chosen at run time from the CPU's flags.
"""

from __future__ import annotations

import torch

from tokenmill.ops.cpu_extension import extension


def supported(head_dim: int, dots: bool = False) -> bool:
    """Whether the kernel runs here (AMX tiles granted, or AVX512-BF16) for this head size (a multiple
    of 32, at most 256); `dots`: whether its dot-product path does (the engine takes the tiles where
    they are; tests run both)."""
    ext = extension()
    return ext is not None and ext.flash_prefill_supported(head_dim, dots)


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  dots: bool = False) -> torch.Tensor:
    """Causal attention of one prompt: q [T, heads, head_dim], k and v [T, kv_heads, head_dim], bf16,
    kv_heads dividing heads (each token's heads contiguous; other layouts are copied) -> [T, heads,
    head_dim] bf16. `dots`: the dot-product path even where the tile units are."""
    return extension().flash_prefill(q, k, v, scale, dots)
