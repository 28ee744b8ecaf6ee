"""Paged decode attention on the CPU with the cache read in place (`cpu_paged_decode.cpp`).

The gather + SDPA path of `model/attention/cpu.py` copies every decoding request's blocks out of
the cache before attending (a memory-bound copy of all K and V each layer); this kernel walks the
block table instead, one task per (request, KV head), the query heads of a group together. At
SmolLM2-135M's shape, batch 32 with 64-192 tokens of context, 2 threads: 0.16-0.22 ms a layer
against 0.37-0.56 for gather + SDPA, and 10 against 50-70 us for one request
(`python -m tokenmill.benchmarks.kernels.cpu_paged_decode`).

No library offers this for PyTorch's CPU build, so it is C++ of our own, built once per machine
by torch.utils.cpp_extension (ninja and the C++ compiler `--cpu-compile` already needs) with the
vector ISA inductor picks for the machine, into tokenmill's cache folder. Where the build fails
the engine says so once and the CPU backend keeps gather + SDPA.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from tokenmill.config.cache_root import cache_root

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_paged_decode.cpp")


@functools.cache
def extension():
    """The built extension, or None where it cannot be built here (the reason is logged once)."""
    try:
        from torch._inductor import cpu_vec_isa
        from torch.utils.cpp_extension import load

        isa = cpu_vec_isa.pick_vec_isa()
        # -fopenmp: ATen's parallel_for is inlined into the extension and runs on one thread without it.
        flags = ["-O3", "-fopenmp", *str(isa.build_arch_flags()).split(), *(f"-D{m}" for m in isa.build_macro())]
        # The build folder is named after the ISA: a cache folder shared by different machines
        # never hands one machine another's instructions.
        isa_name = "-".join(str(isa).split()) or "generic"  # e.g. "avx512-avx512_vnni-amx_tile"
        folder = cache_root() / "cpu_kernels" / f"{torch.__version__}-{isa_name}"
        folder.mkdir(parents=True, exist_ok=True)
        ext = load("tokenmill_cpu_paged_decode", [str(_SOURCE)], extra_cflags=flags, build_directory=str(folder))
        _register_fake()
        return ext
    except Exception as error:  # no compiler, no ninja, a header mismatch: the SDPA path serves
        logger.warning("the CPU paged-decode kernel could not be built (%s: %s); decode attention gathers "
                       "the cache blocks and calls SDPA instead", type(error).__name__, str(error).splitlines()[0])
        return None


def _register_fake() -> None:
    """Shapes of `tokenmill::cpu_paged_attention_native` (registered by the extension) for the compiler."""
    def fake(q, k, v, k_cache, v_cache, slot_mapping, block_table, seq_lens, query_start_loc, scale, k_scale,
             v_scale, causal):
        return torch.empty_like(q)

    torch.library.register_fake("tokenmill::cpu_paged_attention_native", fake)


def supports(head_dim: int) -> bool:
    """Whether the kernel serves this head size on this machine (builds it on first use). It takes
    q and the cache in bfloat16, float16 or float32, the same for both."""
    ext = extension()
    return ext is not None and head_dim % ext.vector_width() == 0


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, heads, head_dim] against each request's `seq_lens[i]` tokens in the cache
    [blocks, block_size, kv_heads, head_dim] through `block_table` rows; [B, heads, head_dim]."""
    return extension().paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)
