"""Launch configurations of the fused MoE kernels (`fused_moe.py`, `fused_moe_gemv.py`) and of the
one-launch router (`moe_routing.route_from_hidden`): measured ones per GPU and expert shape where
the sweep has run, a heuristic (or a default) elsewhere.

A configuration serves both grouped GEMMs of one layer call (they share the alignment, hence
`block_m`). Measured tables come from `python -m tokenmill.benchmarks.kernels.fused_moe --sweep`
(every candidate timed in a CUDA graph at each batch size; it writes the entries to paste into
`TUNED`). Keys: the device name, then (local experts, hidden size, per-rank intermediate size,
element bytes), then the token count the entry was measured at; a call uses the entry measured at
the nearest token count.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton


class MoeKernelConfig(NamedTuple):
    block_m: int  # rows (token-expert entries) per program; also the alignment's block
    block_n: int
    block_k: int
    group_m: int  # row blocks walked together (L2 reuse of the expert weights)
    num_warps: int
    num_stages: int


# Up to this many tokens the routed experts run token by token (`fused_moe_gemv.py`): two launches
# instead of five, at the cost of reading an expert twice when two tokens share it (at 4 tokens,
# top-8 of 128 experts: ~1.1x the bytes). The micro-benchmark prints both paths at decode sizes.
GEMV_MAX_TOKENS = 4

# device name -> (E_local, H, I_local, element bytes) -> tokens -> config
TUNED: dict[str, dict[tuple[int, int, int, int], dict[int, MoeKernelConfig]]] = {
    # Qwen3-30B-A3B's experts, bf16 (the sweep's log: docs/results/families-h100-2026-12-06/fused_moe_kernels.log)
    # NVIDIA H100 80GB HBM3: python -m tokenmill.benchmarks.kernels.fused_moe --sweep
    "NVIDIA H100 80GB HBM3": {
        (128, 2048, 768, 2): {
            1: MoeKernelConfig(16, 32, 128, 1, 4, 3),
            2: MoeKernelConfig(16, 32, 128, 1, 4, 3),
            4: MoeKernelConfig(16, 64, 128, 1, 4, 3),
            8: MoeKernelConfig(16, 32, 128, 1, 4, 3),
            16: MoeKernelConfig(16, 32, 256, 1, 4, 3),
            64: MoeKernelConfig(16, 32, 128, 1, 4, 3),
            128: MoeKernelConfig(16, 128, 128, 1, 4, 3),
            512: MoeKernelConfig(64, 64, 64, 8, 4, 3),
            2048: MoeKernelConfig(128, 128, 64, 8, 8, 3),
            8192: MoeKernelConfig(128, 128, 64, 8, 8, 3),
        },
    },
}


def default_config(num_tokens: int, num_local_experts: int, top_k: int, element_bytes: int) -> MoeKernelConfig:
    """The heuristic: while an expert gets few rows (decode), 16-row blocks over wide K slices
    (the weight stream dominates); with many, 64x128 tiles grouped for L2 reuse. Two regimes
    only, so a serving engine compiles few variants. Float32 halves the K slice and the pipeline
    depth to stay within shared memory."""
    wide = element_bytes <= 2
    rows_per_expert = num_tokens * top_k / max(num_local_experts, 1)
    if num_tokens <= 32 or rows_per_expert <= 16:
        return MoeKernelConfig(16, 64, 128 if wide else 32, 1, 4, 3 if wide else 2)
    return MoeKernelConfig(64, 128, 64 if wide else 32, 8, 8 if wide else 4, 3 if wide else 2)


@functools.lru_cache(maxsize=8)
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _gpu_name(device: torch.device) -> str | None:
    """The name the measured tables are keyed by; None off CUDA."""
    if device.type != "cuda":
        return None
    return _device_name(device.index if device.index is not None else torch.cuda.current_device())


def moe_config(num_tokens: int, num_local_experts: int, top_k: int, hidden_size: int, intermediate_per_rank: int,
               dtype: torch.dtype, device: torch.device) -> MoeKernelConfig:
    """The configuration for a call with `num_tokens` tokens on this layer shape and device."""
    element_bytes = dtype.itemsize
    gpu = _gpu_name(device)
    if gpu is not None:
        by_tokens = TUNED.get(gpu, {}).get((num_local_experts, hidden_size, intermediate_per_rank, element_bytes))
        if by_tokens:
            return by_tokens[min(by_tokens, key=lambda measured: abs(measured - num_tokens))]
    return default_config(num_tokens, num_local_experts, top_k, element_bytes)


class MoeGemvConfig(NamedTuple):
    """The token-by-token path's two kernels (`fused_moe_gemv.py`)."""
    gate_up_block_n: int  # intermediate rows per program (gate and up rows each)
    gate_up_block_k: int
    gate_up_warps: int
    down_rows: int  # hidden rows per program, summed over the k experts (each expert: down_rows / k)
    down_block_k: int
    down_warps: int


DEFAULT_GEMV = MoeGemvConfig(16, 256, 4, 32, 128, 4)

# Measured by `python -m tokenmill.benchmarks.kernels.fused_moe --gemv-sweep --write-table` (the
# kernels launched as the engine launches them: dependent where the GPU supports it), which
# replaces this GPU's table. Keys: (local experts, hidden size, per-rank intermediate size,
# element bytes, top_k); bf16 and fp16 experts only (fp8 experts take `DEFAULT_GEMV`).
# H100 80GB HBM3, 2026-12-07 (docs/results/moe-h100-2026-12-07/call2/gemv_sweep.log).
_H100_GEMV: dict[tuple[int, int, int, int, int], MoeGemvConfig] = {
    (128, 2048, 768, 2, 8): MoeGemvConfig(16, 128, 8, 16, 256, 8),  # 30.2 us (default 34.5)
}
_H200_GEMV: dict[tuple[int, int, int, int, int], MoeGemvConfig] = {
}
TUNED_GEMV = {"NVIDIA H100 80GB HBM3": _H100_GEMV, "NVIDIA H200": _H200_GEMV}


def moe_gemv_config(num_local_experts: int, top_k: int, hidden_size: int, intermediate_per_rank: int,
                    dtype: torch.dtype, device: torch.device) -> MoeGemvConfig:
    """The token-by-token path's configuration for this layer shape and device."""
    gpu = _gpu_name(device)
    if gpu is None or dtype.itemsize == 1:
        return DEFAULT_GEMV
    key = (num_local_experts, hidden_size, intermediate_per_rank, dtype.itemsize, top_k)
    return TUNED_GEMV.get(gpu, {}).get(key, DEFAULT_GEMV)


class RouterConfig(NamedTuple):
    """The one-launch router's (`moe_routing.route_from_hidden`): experts' rows per program, the K
    slice, and warps (the routing itself, in the last program, runs on the same warps)."""
    block_n: int
    block_k: int
    num_warps: int


def default_router_config(num_experts: int, hidden_size: int) -> RouterConfig:
    """Two experts' rows a program where there are >= 64 experts (>= 32 programs), one warp (its
    top-k reductions are register shuffles only, where more warps meet in shared memory)."""
    return RouterConfig(2 if num_experts >= 64 else 1, min(1024, triton.next_power_of_2(hidden_size)),
                        1 if num_experts <= 512 else 4)


# Measured by `python -m tokenmill.benchmarks.kernels.fused_moe --router-sweep --write-table`
# (each configuration's cost in a graph of dependent launches after a GEMV, as a decode graph runs
# it), which replaces this GPU's table. Keys: (experts, hidden size, element bytes, fused input norm).
# H100 80GB HBM3, 2026-12-07 (docs/results/moe-h100-2026-12-07c/): us a layer, the default's beside.
_H100_ROUTER: dict[tuple[int, int, int, bool], RouterConfig] = {
    (128, 2048, 2, True): RouterConfig(2, 2048, 1),  # 5.64 us (default 6.82)
}
_H200_ROUTER: dict[tuple[int, int, int, bool], RouterConfig] = {
}
TUNED_ROUTER = {"NVIDIA H100 80GB HBM3": _H100_ROUTER, "NVIDIA H200": _H200_ROUTER}


def router_config(num_experts: int, hidden_size: int, dtype: torch.dtype, norm: bool,
                  device: torch.device) -> RouterConfig:
    """The one-launch router's configuration for this shape and device."""
    gpu = _gpu_name(device)
    measured = TUNED_ROUTER.get(gpu, {}).get((num_experts, hidden_size, dtype.itemsize, norm)) if gpu else None
    return measured or default_router_config(num_experts, hidden_size)
