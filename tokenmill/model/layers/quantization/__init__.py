"""Quantised methods, chosen per layer when it is built from the model's quantisation
(`config/quantization.py`, in the build context): `linear_method()` is what every linear layer
multiplies with, `moe_method()` what a `FusedMoE` layer's experts are. fp8 methods live in
`fp8.py` and `fp8_moe.py`; `not_converted.py` returns the layers a checkpoint keeps unquantised
(`modules_to_not_convert`) to the plain method once their names are known. `gguf.py`: a GGUF
file's blocks kept quantised on the CPU (`KernelConfig.gguf_weight_type`)."""

from __future__ import annotations

from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear_method import LinearMethod, unquantized_linear_method
from tokenmill.model.layers.quantization.moe_method import MoeMethod


def linear_method() -> LinearMethod:
    """The method of a linear layer built now: the model's quantisation, on this device."""
    context = build_context()
    if context.kernels.gguf_weight_type is not None:
        import torch

        from tokenmill.model.layers.quantization.gguf import GgufLinearMethod
        from tokenmill.ops import cpu_quant_matmul
        int8 = context.kernels.gguf_int8_activations and cpu_quant_matmul.available()
        return GgufLinearMethod(context.kernels.gguf_weight_type, torch.get_default_dtype(), int8)
    if context.quantization is None:
        return unquantized_linear_method()
    from tokenmill.model.layers.quantization.fp8 import fp8_linear_method
    return fp8_linear_method(context.quantization, context)


def moe_method() -> MoeMethod:
    """The method of a `FusedMoE` layer's routed experts built now."""
    context = build_context()
    if context.quantization is None:
        return MoeMethod()
    from tokenmill.model.layers.quantization.fp8 import fp8_kernels_available
    from tokenmill.model.layers.quantization.fp8_moe import Fp8MoeMethod
    quant = context.quantization
    return Fp8MoeMethod(quant.weight_block_size, quant.ue8m0_activation_scales, fp8_kernels_available(context))
