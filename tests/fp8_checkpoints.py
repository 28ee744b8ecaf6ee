"""Block-FP8 checkpoints made in the test from an HF model: the format DeepSeek-V3, Kimi-K2,
MiniMax-M2 and Qwen3 `-FP8` ship (e4m3 `weight` + float32 `weight_scale_inv` per block of every
quantised linear layer and routed expert, `quantization_config` in config.json), and the HF model
holding exactly the dequantised weights: the reference tokenmill's logits are compared with.

The model is saved by HF first (so the checkpoint has HF's own tensor names, per-expert ones for
MoE models), then every quantised tensor is rewritten; the reference is HF loading a sibling
folder of the dequantised tensors. Which modules are quantised follows HF's FP8 conversion: the
weights of linear layers, not embeddings, the LM head or norms, and not the modules in `keep`
(listed in `modules_to_not_convert`, matched by HF's own rule) or `skip` (unquantised without
being listed, as DeepSeek-V3 ships its router: HF does not convert it, it is no `nn.Linear`).
"""

from __future__ import annotations

import glob
import json
import os

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.quantizers.quantizers_utils import should_convert_module

from tokenmill.ops.fp8_format import dequantize_weight_blocks, quantize_weight_blocks


def _quantised(name: str, tensor: torch.Tensor, patterns: list[str]) -> bool:
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    module = name.removesuffix(".weight")
    if module.endswith(("embed_tokens", "lm_head")) or "norm" in module.rpartition(".")[2]:
        return False
    return should_convert_module(module, patterns or None)


def save_block_fp8(model: torch.nn.Module, folder: str, block=(128, 128), keep: tuple[str, ...] = (),
                   skip: tuple[str, ...] = (), extra_config: dict | None = None) -> torch.nn.Module:
    """Write `model` (an HF model) to `folder` as a block-FP8 checkpoint; return the HF model of
    the dequantised weights (in `model`'s dtype, eval mode)."""
    model.save_pretrained(folder)
    dequantised_folder = folder.rstrip("/") + "_dequantised"
    model.save_pretrained(dequantised_folder)
    patterns = list(keep) + list(skip)
    for path in glob.glob(os.path.join(folder, "*.safetensors")):
        tensors, dequantised = load_file(path), {}
        for name in list(tensors):
            tensor = tensors[name]
            if _quantised(name, tensor, patterns):
                w_q, scale = quantize_weight_blocks(tensor, block)
                tensors[name] = w_q
                tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
                dequantised[name] = dequantize_weight_blocks(w_q, scale, block, tensor.dtype)
            else:
                dequantised[name] = tensor
        save_file(tensors, path, metadata={"format": "pt"})
        save_file(dequantised, os.path.join(dequantised_folder, os.path.basename(path)), metadata={"format": "pt"})
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block), **(extra_config or {})}
    if keep:
        config["quantization_config"]["modules_to_not_convert"] = list(keep)
    json.dump(config, open(config_path, "w"), indent=2)
    return AutoModelForCausalLM.from_pretrained(dequantised_folder, dtype=model.dtype).eval()
