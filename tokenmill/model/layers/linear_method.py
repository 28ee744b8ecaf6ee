"""How a linear layer multiplies by its weight: the kernel picked once, when the layer is built.

- CPU: oneDNN with the weight re-laid-out once after loading (`ops/cpu_gemm.py`: faster GEMMs at
  decode shapes than `F.linear`); with the cpu backend's C++ kernels (`--cpu-native-decode`),
  one-row bf16 products (batch-1 decode) through `ops/cpu_gemv.py`, which streams the weight
  faster than oneDNN and without its per-call set-up.
- CUDA: cuBLAS (`F.linear`); inside a decode CUDA graph (`forward_context().decode_graph`), one-row
  products run the Triton GEMV (`ops/gemv.py`), 1.08x cuBLAS on the Llama-3.1-8B weight set
  (docs/perf.md). `--no-triton-gemv` keeps cuBLAS everywhere.

Batch-invariant mode (`KernelConfig.batch_invariant`, docs/rl.md): every row is multiplied the
same way whatever the number of rows. CPU: oneDNN picks its kernel by the row count (in bf16 it
switches between 32 and 64 rows), so rows go through in tiles of exactly `INVARIANT_ROW_TILE`,
the last one zero-padded. CUDA: a fixed-configuration Triton GEMM (`ops/matmul_batch_invariant.py`).

`apply_silu_mul(layer, gate_up)` is `apply(layer, silu_and_mul(gate_up))`, the gated MLP's down
projection: where the GEMV runs, it computes the activation as it loads x (bit-identical, one
kernel less per MLP at batch-1 decode). `push`: a `PushTarget` (distributed/symm_mem.py) the GEMV
sends its output row to, for a tensor-parallel sum fused into the next RMSNorm; `apply` returns
whether it did.

`apply_after_norm(layer, norm, x, residual)` is `apply(layer, norm(x, residual))` with the norm's
new residual, for a pre-norm block's first product (`RMSNorm.forward_then`): where the GEMV runs
and `fuses_norm` says so, the norm is inside it (`gemv.rms_norm_gemv`, bit-identical, one kernel
less per norm at batch-1 decode).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.build_context import build_context
from tokenmill.model.forward_context import current_forward_context
from tokenmill.ops import cpu_gemm, cpu_gemv
from tokenmill.ops.cpu_gemm import apply_activation

if TYPE_CHECKING:
    from tokenmill.distributed.symm_mem import PushTarget


class LinearMethod:
    """Base: `F.linear` on the layer's `weight` (and `bias`), then its `activation`; the reference.

    A method owns the parameters it multiplies by (`create_weights`): a plain `weight [out, in]`
    here, an fp8 weight and its scales for the quantised methods (`layers/quantization/`). The
    layer's `weight_loader` shards every 2-D parameter as `[out, in]` and every 1-D one as `[out]`,
    at the granularity `param_granularity(name)` gives: (1, 1) elements, or one entry per
    `(bn, bk)` block for block scales.
    """

    def create_weights(self, layer: nn.Module, in_features: int, out_features: int) -> None:
        """Register the parameters of a `[out_features, in_features]` product on `layer` (this
        rank's shard; `layer.output_ranges()` / `input_range()` say where it comes from)."""
        layer.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def param_granularity(self, name: str) -> tuple[int, int]:
        """Weight elements per entry of parameter `name`, along (out, in)."""
        return 1, 1

    def create_weight(self, out_features: int, in_features: int) -> nn.Parameter:
        """The layer's `weight` parameter, in the form the checkpoint stores it (`[out, in]`)."""
        return nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        pass

    def drop_derived_weights(self, layer: nn.Module) -> None:
        """Drop what `process_weights_after_loading` derived from the weights (sleep); it is
        derived again when the weights come back."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None,
              push: "PushTarget | None" = None) -> tuple[torch.Tensor, bool]:
        return apply_activation(F.linear(x, layer.weight, bias), layer.activation), False

    def apply_silu_mul(self, layer: nn.Module, gate_up: torch.Tensor, silu_and_mul: nn.Module,
                       bias: torch.Tensor | None = None, push: "PushTarget | None" = None
                       ) -> tuple[torch.Tensor, bool]:
        return self.apply(layer, silu_and_mul(gate_up), bias, push)

    def fuses_norm(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether `apply_after_norm` runs the norm inside this product for input `x`."""
        return False

    def apply_after_norm(self, layer: nn.Module, norm: nn.Module, x: torch.Tensor,
                         residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(layer's product of norm(x + residual), x + residual)` in one kernel, where
        `fuses_norm` said so (a bias-free, activation-free layer: the caller checks)."""
        raise NotImplementedError(f"{type(self).__name__} does not fuse a norm")


class CpuLinearMethod(LinearMethod):
    """oneDNN with a pre-packed weight where this torch build has it; `F.linear` otherwise.

    `pack=False` (a layer inside the compiled CPU forward): `F.linear`, which inductor's freezing
    pass turns into oneDNN with a weight it packs itself. `native_gemv`: one-row products of a bf16
    weight through the C++ GEMV (inside the compiled forward, the one-token graph's linears)."""

    def __init__(self, pack: bool = True, native_gemv: bool = False) -> None:
        self.pack = pack
        self.native_gemv = native_gemv
        self.packed: torch.Tensor | None = None

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if self.pack:
            self.packed = cpu_gemm.pack_weight(layer.weight)

    def drop_derived_weights(self, layer: nn.Module) -> None:
        self.packed = None

    def apply(self, layer, x, bias=None, push=None):
        if self.native_gemv and cpu_gemv.takes(x, layer.weight):
            return apply_activation(cpu_gemv.gemv(x, layer.weight, bias), layer.activation), False
        # oneDNN applies the activation inside the GEMM (a post-op): no extra pass over the output.
        return cpu_gemm.linear(x, layer.weight, self.packed, bias, layer.activation), False


class CudaLinearMethod(LinearMethod):
    def __init__(self, triton_gemv: bool, pdl: bool = False) -> None:
        self.triton_gemv = triton_gemv
        if triton_gemv:
            from tokenmill.ops import gemv
            self._gemv = functools.partial(gemv.gemv, pdl=pdl)
            self._rms_norm_gemv = functools.partial(gemv.rms_norm_gemv, pdl=pdl)

    def uses_gemv(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether the product of one row `x` and `weight` runs the Triton GEMV (batch-1 decode graphs)."""
        return (self.triton_gemv and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype
                and current_forward_context().decode_graph)

    def apply(self, layer, x, bias=None, push=None):
        if layer.activation is not None or not self.uses_gemv(x, layer.weight):
            return apply_activation(F.linear(x, layer.weight, bias), layer.activation), False
        push = push if bias is None else None  # a bias is added after the product: rows not final
        y = self._gemv(x, layer.weight, silu_mul=False, push=push)
        return (y if bias is None else y + bias), push is not None

    def apply_silu_mul(self, layer, gate_up, silu_and_mul, bias=None, push=None):
        if not self.uses_gemv(gate_up, layer.weight):
            return self.apply(layer, silu_and_mul(gate_up), bias, push)
        push = push if bias is None else None
        y = self._gemv(gate_up, layer.weight, silu_mul=True, push=push)
        return (y if bias is None else y + bias), push is not None

    def fuses_norm(self, layer, x):
        return layer.bias is None and layer.activation is None and self.uses_gemv(x, layer.weight)

    def apply_after_norm(self, layer, norm, x, residual):
        return self._rms_norm_gemv(x, norm.weight, norm.eps, layer.weight, residual)


# Rows per oneDNN call in batch-invariant mode: one kernel for all of them (measured 128 GFLOP/s
# in bf16 at 2048 x 576 x 1536 on the dev CPU, against 236 for one call over all rows).
INVARIANT_ROW_TILE = 32


class BatchInvariantCpuLinearMethod(CpuLinearMethod):
    """The CPU product in fixed tiles of INVARIANT_ROW_TILE rows (see the module docstring)."""

    def apply(self, layer, x, bias=None, push=None):
        tile = INVARIANT_ROW_TILE
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        rows = x2.shape[0]
        out = torch.empty((rows, layer.weight.shape[0]), dtype=x.dtype, device=x.device)
        padded = None
        for start in range(0, rows, tile):
            chunk = x2[start:start + tile]
            n = chunk.shape[0]
            if n < tile:
                if padded is None:
                    padded = x2.new_zeros((tile, shape[-1]))
                padded[:n] = chunk
                chunk = padded
            out[start:start + n] = cpu_gemm.linear(chunk, layer.weight, self.packed, bias, layer.activation)[:n]
        return out.view(*shape[:-1], out.shape[-1]), False


class BatchInvariantCudaLinearMethod(LinearMethod):
    def __init__(self) -> None:
        from tokenmill.ops import matmul_batch_invariant
        self._matmul = matmul_batch_invariant.matmul

    def apply(self, layer, x, bias=None, push=None):
        return apply_activation(self._matmul(x, layer.weight, bias), layer.activation), False


def unquantized_linear_method(in_compiled_graph: bool = True) -> LinearMethod:
    """The method for a bf16/fp16/fp32 weight, for the device being built for.
    `in_compiled_graph`: whether the layer runs inside the model forward (which `cpu_compile`
    compiles), not after it (the LM head)."""
    context = build_context()
    if context.kernels.batch_invariant:
        return BatchInvariantCudaLinearMethod() if context.on_cuda else BatchInvariantCpuLinearMethod()
    if context.on_cuda:
        return CudaLinearMethod(context.kernels.triton_gemv, context.pdl)
    if context.device.type == "cpu":
        return CpuLinearMethod(pack=not (context.kernels.cpu_compile and in_compiled_graph),
                               native_gemv=context.kernels.cpu_native_decode and cpu_gemv.available())
    return LinearMethod()
