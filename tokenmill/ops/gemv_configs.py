"""Measured launch configurations of the batch-1 GEMV (`gemv.py`), per GPU and matrix shape.

Each entry is the fastest of 244 configurations (BLOCK_N x BLOCK_K, warps, stages) timed the way
the engine runs the kernel: a CUDA graph of back-to-back GEMVs over >= 1 GB of distinct bf16
weights, so none is served from L2 (`python3 -m tokenmill.benchmarks.kernels.gemv --graph-sweep`; results and the
autotuner's picks beside them in docs/perf.md and docs/results/session7/). Shapes are one rank's
matrices of Llama-3.1-8B at TP=1 and TP=2 (QKV, O, gate/up, down with its fused SiLU-and-mul, LM
head). Anything not listed (another GPU, shape or dtype) is left to Triton's autotuner.

The neighbours of each winner were within ~1% of it, so these are not fragile choices; what they
replace is the autotuner's `do_bench` pick, 2-10% slower in the graph (its timings of a lone 5 us
launch are mostly launch overhead).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class GemvConfig(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# (N, K, fused SiLU-and-mul) -> config; 2-byte weights (bf16 / fp16) only.
_H200 = {
    # Llama-3.1-8B, TP=2 (one rank's share)
    (3072, 4096, False): GemvConfig(8, 1024, 8, 2),  # QKV: 8.08 us in the graph (autotuner's pick 8.74)
    (4096, 2048, False): GemvConfig(2, 1024, 1, 2),  # O: 5.68 (6.27)
    (14336, 4096, False): GemvConfig(8, 256, 2, 3),  # gate/up: 28.59 (29.04)
    (4096, 7168, True): GemvConfig(8, 1024, 4, 2),  # down + SiLU: 16.37 (16.81)
    (64128, 4096, False): GemvConfig(4, 512, 1, 3),  # LM head: 117.8 (121.9)
    # Llama-3.1-8B, TP=1
    (6144, 4096, False): GemvConfig(16, 512, 8, 1),  # QKV: 13.87 (13.97)
    (4096, 4096, False): GemvConfig(2, 1024, 1, 2),  # O: 9.71 (10.37)
    (28672, 4096, False): GemvConfig(16, 256, 4, 2),  # gate/up: 54.34 (54.85)
    (4096, 14336, True): GemvConfig(8, 1024, 4, 3),  # down + SiLU: 30.06 (30.40)
    (128256, 4096, False): GemvConfig(16, 256, 4, 2),  # LM head: 229.9 (237.0)
}

TUNED: dict[str, dict[tuple[int, int, bool], GemvConfig]] = {"NVIDIA H200": _H200}

# Launched dependent (`ops/pdl.py`), as batch-1 decode graphs launch them on Hopper: (N, K, fused
# SiLU-and-mul, fused input norm `rms_norm_gemv`) -> config, the fastest of `GRAPH_SWEEP_GRID` in a
# graph of dependent launches (`python3 -m tokenmill.benchmarks.kernels.gemv --graph-sweep --model
# qwen3-30b-a3b --pdl --write-table` writes the table of the GPU it runs on). A shape missing here
# takes the ordinary table's entry, then the autotuner's pick. H100 80GB HBM3: Qwen3-30B-A3B's dense
# shapes, 2026-12-07, us in the graph, the autotuner's pick in brackets
# (docs/results/moe-h100-2026-12-07c/dense_gemv_sweep.log).
_H100_PDL: dict[tuple[int, int, bool, bool], GemvConfig] = {
    (5120, 2048, False, True): GemvConfig(16, 512, 8, 4),  # QKV with its input norm: 8.20 us (8.96)
    (2048, 4096, False, False): GemvConfig(1, 1024, 4, 4),  # O: 6.24 (7.72)
    (151936, 2048, False, False): GemvConfig(4, 1024, 8, 3),  # LM head: 194.6 (195.9)
}
_H200_PDL: dict[tuple[int, int, bool, bool], GemvConfig] = {
}
TUNED_PDL: dict[str, dict[tuple[int, int, bool, bool], GemvConfig]] = {"NVIDIA H100 80GB HBM3": _H100_PDL,
                                                                       "NVIDIA H200": _H200_PDL}

# The fp8 GEMV (`fp8_gemv.py`): (N, K, fused SiLU-and-mul, scale form "block" | "channel") -> config,
# the fastest of `benchmarks/kernels/fp8.py`'s GEMV_SWEEP_GRID timed the same way (one CUDA graph
# over >= 1 GB of distinct e4m3 weights: `python3 -m tokenmill.benchmarks.kernels.fp8 gemv-sweep`).
# Llama-3.1-8B, TP=1, on an H100 80GB HBM3 (2026-12-07, docs/results/fp8-gemv-h100-2026-12-07/sweep.log;
# us in the graph, the autotuner's pick in brackets).
_H100_FP8 = {
    (6144, 4096, False, "block"): GemvConfig(8, 512, 4, 2),  # QKV: 11.04 (11.02, the same pick)
    (6144, 4096, False, "channel"): GemvConfig(8, 512, 8, 2),  # QKV: 10.76 (10.81)
    (4096, 4096, False, "block"): GemvConfig(8, 1024, 4, 1),  # O: 8.12 (9.39)
    (4096, 4096, False, "channel"): GemvConfig(2, 1024, 2, 3),  # O: 7.75 (8.42)
    (28672, 4096, False, "block"): GemvConfig(8, 256, 2, 1),  # gate/up: 41.06 (41.59)
    (28672, 4096, False, "channel"): GemvConfig(16, 256, 4, 1),  # gate/up: 40.58 (41.83)
    (4096, 14336, True, "block"): GemvConfig(16, 1024, 4, 2),  # down + SiLU: 23.85 (28.04)
    (4096, 14336, True, "channel"): GemvConfig(8, 1024, 8, 1),  # down + SiLU: 22.15 (22.23)
}

# Launched dependent (`ops/pdl.py`), a GEMV reads its first weight tile while the kernel before it
# finishes, and its tail overlaps the next one's start: other configurations win
# (`gemv-sweep --pdl --write-table` writes the table of the GPU it runs on). A shape missing here takes
# the ordinary table's entry. H100 80GB HBM3, 2026-12-07, the 33 configurations among the six
# fastest of any shape in the ordinary sweep (`--grid-from`), us in the graph, the ordinary
# table's pick launched dependent in brackets (docs/results/pdl-h100-2026-12-07/call4/).
_H100_FP8_PDL: dict[tuple[int, int, bool, str], GemvConfig] = {
    (6144, 4096, False, "block"): GemvConfig(16, 512, 8, 2),  # QKV: 10.12 (10.30)
    (6144, 4096, False, "channel"): GemvConfig(16, 512, 8, 1),  # QKV: 10.10 (13.22)
    (4096, 4096, False, "block"): GemvConfig(8, 1024, 4, 2),  # O: 6.89 (6.92)
    (4096, 4096, False, "channel"): GemvConfig(8, 1024, 4, 1),  # O: 6.91 (8.87)
    (28672, 4096, False, "block"): GemvConfig(16, 256, 4, 1),  # gate/up: 40.15 (40.47)
    (28672, 4096, False, "channel"): GemvConfig(16, 256, 4, 1),  # gate/up: 39.66 (39.79)
    (4096, 14336, True, "block"): GemvConfig(8, 1024, 4, 1),  # down + SiLU: 22.36 (22.75)
    (4096, 14336, True, "channel"): GemvConfig(8, 1024, 8, 3),  # down + SiLU: 21.24 (21.25)
}

TUNED_FP8: dict[str, dict[tuple[int, int, bool, str], GemvConfig]] = {"NVIDIA H100 80GB HBM3": _H100_FP8}
_H200_FP8_PDL: dict[tuple[int, int, bool, str], GemvConfig] = {
}
TUNED_FP8_PDL: dict[str, dict[tuple[int, int, bool, str], GemvConfig]] = {"NVIDIA H100 80GB HBM3": _H100_FP8_PDL,
                                                                          "NVIDIA H200": _H200_FP8_PDL}


@functools.lru_cache(maxsize=8)
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _lookup(tables: dict, weight: torch.Tensor, key: tuple) -> GemvConfig | None:
    """`key` in the table of the GPU `weight` lives on; None off CUDA or where nothing is listed."""
    if weight.device.type != "cuda":
        return None
    index = weight.device.index if weight.device.index is not None else torch.cuda.current_device()
    return tables.get(_device_name(index), {}).get(key)


def tuned_fp8_config(weight: torch.Tensor, silu_mul: bool, blockwise: bool, pdl: bool = False) -> GemvConfig | None:
    """The measured fp8 GEMV configuration for this e4m3 weight's shape and scale form on its GPU,
    launched dependent (`pdl`) or not, or None (autotune)."""
    key = (weight.shape[0], weight.shape[1], silu_mul, "block" if blockwise else "channel")
    return (pdl and _lookup(TUNED_FP8_PDL, weight, key)) or _lookup(TUNED_FP8, weight, key)


def tuned_config(weight: torch.Tensor, silu_mul: bool, pdl: bool = False, norm: bool = False) -> GemvConfig | None:
    """The measured configuration for this weight's shape on its GPU, launched dependent (`pdl`) or
    not, with the input norm fused (`norm`) or not, or None (autotune)."""
    if weight.element_size() != 2:
        return None
    shape = (weight.shape[0], weight.shape[1], silu_mul)
    return (pdl and _lookup(TUNED_PDL, weight, (*shape, norm))) or _lookup(TUNED, weight, shape)
