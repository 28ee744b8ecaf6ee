"""Layers a quantised checkpoint keeps unquantised (`modules_to_not_convert`, e.g. MiniMax-M2's
`gate` and `lm_head`): matched by their HF names once the model is built, and switched to the
plain method before any weight is loaded (linear layers, and routed experts as a whole).

Layers are built before they have names, so every linear layer first takes the model's
quantisation; `keep_unquantized_modules` then names them (a merged layer by the HF modules merged
into it, through the model class's `stacked_params`) and switches those the config lists. A merged
layer whose parts disagree cannot hold both formats in one matrix and is refused.
"""

from __future__ import annotations

from torch import nn

from tokenmill.config.quantization import QuantizationConfig
from tokenmill.model.layers.linear import LinearBase
from tokenmill.model.layers.linear_method import unquantized_linear_method
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.quantization.moe_method import MoeMethod


def hf_module_names(model: nn.Module, name: str) -> list[str]:
    """The checkpoint's module names behind module `name` (`...qkv_proj` -> its q/k/v_proj)."""
    parent, _, leaf = name.rpartition(".")
    parts = [part for merged, part, _ in getattr(model, "stacked_params", ()) if merged == leaf]
    return [f"{parent}.{part}" if parent else part for part in parts] or [name]


def keep_unquantized_modules(model: nn.Module, quant: QuantizationConfig) -> list[str]:
    """Switch the linear layers and routed experts (`FusedMoE`, HF's `...experts` module)
    `quant.modules_to_not_convert` names to the unquantised methods; returns their names."""
    if not quant.modules_to_not_convert:
        return []
    prefix = getattr(model, "hf_name_prefix", "") or ""
    kept = []
    for name, module in model.named_modules():
        if isinstance(module, FusedMoE):
            if quant.keeps_unquantized(prefix + name):
                module.use_method(MoeMethod())
                kept.append(name)
            continue
        if not isinstance(module, LinearBase):
            continue
        hf_names = [prefix + n for n in hf_module_names(model, name)]
        flags = {n: quant.keeps_unquantized(n) for n in hf_names}
        if not any(flags.values()):
            continue
        if not all(flags.values()):
            raise ValueError(f"modules_to_not_convert keeps {[n for n, f in flags.items() if f]} unquantised but "
                             f"not {[n for n, f in flags.items() if not f]}; tokenmill merges them into one "
                             f"matrix ({name}), which holds one format")
        module.use_method(unquantized_linear_method())
        kept.append(name)
    return kept
