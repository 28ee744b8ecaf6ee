"""`linear(x, weight, packed, bias)`: the one place a layer's matrix product picks its kernel.

- CPU with a oneDNN-packed weight: `cpu_gemm` (faster GEMMs at decode shapes).
- CUDA, one row, inside `decode_graph_kernels()` (the decode CUDA graphs' warm-up and capture):
  the Triton GEMV (`triton_gemv`), 1.08x cuBLAS on the Llama-3.1-8B weight set (H100,
  docs/perf.md). `TOKENMILL_TRITON_GEMV=0` turns it off; eager steps keep cuBLAS either way.
- Otherwise `F.linear` (cuBLAS on CUDA).

`linear_silu_mul(x, ...)` is `linear(silu(gate) * up, ...)` for x = [gate | up], the MLP's down
projection: where the Triton GEMV applies, the activation is computed inside it (bit-identical,
one kernel less per MLP at batch-1 decode); elsewhere `SiluAndMul` runs first, as before.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from tokenmill.model.layers import cpu_gemm
from tokenmill.model.layers.basic import SiluAndMul

_ENABLED = os.environ.get("TOKENMILL_TRITON_GEMV", "1") != "0"
_in_decode_graph = False
_silu_and_mul = SiluAndMul()


def gemv_enabled() -> bool:
    return _ENABLED


@contextlib.contextmanager
def decode_graph_kernels():
    """One-row products use the Triton GEMV while this is open. The graph decoder opens it for the
    eager warm-up (which also autotunes the kernel: tuning cannot run during capture) and the
    capture itself, so every replay runs the GEMV."""
    global _in_decode_graph
    previous, _in_decode_graph = _in_decode_graph, _ENABLED
    try:
        yield
    finally:
        _in_decode_graph = previous


def _use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One CUDA row inside the decode graphs, in the weight's dtype: where the GEMV measured faster."""
    return (_in_decode_graph and x.is_cuda and x.dim() == 2 and x.shape[0] == 1
            and x.dtype == weight.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
           bias: torch.Tensor | None = None, push_slot: int | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)`. `push_slot`: the output is this rank's partial sum for the fused
    all-reduce + norm of that slot (`RMSNorm.reduce_add`); a batch-1 GEMV then sends it to the
    peers itself (`_gemv`)."""
    if packed is not None:
        return cpu_gemm.linear(x, weight, packed, bias)
    if _use_gemv(x, weight):
        return _gemv(x, weight, bias, push_slot, silu_mul=False)
    return F.linear(x, weight, bias)


def linear_silu_mul(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None, push_slot: int | None = None) -> torch.Tensor:
    """`linear(silu_and_mul(x), weight, packed, bias, push_slot)` for x = [gate | up] along its
    last dim.

    At batch-1 decode the GEMV computes the activation as it loads x, with the same rounding as
    `silu_and_mul`, so the result is the same bits without the activation kernel in the graph."""
    if packed is None and _use_gemv(x, weight):
        return _gemv(x, weight, bias, push_slot, silu_mul=True)
    return linear(_silu_and_mul(x), weight, packed, bias)


def _gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, push_slot: int | None,
          silu_mul: bool) -> torch.Tensor:
    """The Triton GEMV; for a partial sum headed for a fused all-reduce (`push_slot`, no bias to
    add after it) it also sends its row to the peers, and says so (`tp_note_pushed`)."""
    from tokenmill.distributed.parallel_state import tp_note_pushed, tp_push_target
    from tokenmill.model.layers.triton_gemv import gemv

    push = None
    if push_slot is not None and bias is None:
        push = tp_push_target(push_slot, 1, weight.shape[0], weight.dtype)
    y = gemv(x, weight, silu_mul=silu_mul, push=push)
    if push is not None:
        tp_note_pushed(push_slot, y)
    return y if bias is None else y + bias
