"""The C++ CPU kernels (`cpu_paged_decode.cpp`, `cpu_flash_prefill.cpp`, `cpu_argmax.cpp`,
`cpu_gemv.cpp`, `cpu_quant_matmul.cpp`), built once per machine.

No library offers these for PyTorch's CPU build, so they are C++ of our own, compiled together by
torch.utils.cpp_extension (ninja and the C++ compiler `--cpu-compile` already needs) with the
vector ISA inductor picks for the machine, into tokenmill's cache folder (~20 s the first time,
then loaded from there). Where the build fails the engine says so once and each caller keeps its
torch path.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from tokenmill.config.cache_root import cache_root

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).with_name(name) for name in ("cpu_paged_decode.cpp", "cpu_flash_prefill.cpp",
                                                   "cpu_argmax.cpp", "cpu_gemv.cpp", "cpu_quant_matmul.cpp")]


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
        ext = load("tokenmill_cpu_kernels", [str(s) for s in _SOURCES], extra_cflags=flags,
                   build_directory=str(folder))
        _register_fakes()
        return ext
    except Exception as error:  # no compiler, no ninja, a header mismatch: the torch paths serve
        logger.warning("the C++ CPU kernels could not be built (%s: %s); decode attention gathers the cache "
                       "blocks and calls SDPA, greedy picks call torch.argmax, one-row products oneDNN",
                       type(error).__name__,
                       str(error).splitlines()[0])
        return None


def _register_fakes() -> None:
    """Shapes of the ops the extension registers, for the compiler."""
    def attention(q, k, v, k_cache, v_cache, slot_mapping, block_table, seq_lens, query_start_loc, scale, k_scale,
                  v_scale, causal):
        return torch.empty_like(q)

    def argmax(logits):
        return logits.new_empty(logits.shape[:1], dtype=torch.int64)

    def gemv(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    def quant_matmul(x, qs, d, m, bits, n, bias):
        return x.new_empty(x.shape[0], n)

    torch.library.register_fake("tokenmill::cpu_paged_attention_native", attention)
    torch.library.register_fake("tokenmill::cpu_argmax", argmax)
    torch.library.register_fake("tokenmill::cpu_gemv", gemv)
    torch.library.register_fake("tokenmill::cpu_quant_matmul", quant_matmul)
