"""Block-FP8 checkpoints made in the test from an HF model: the format DeepSeek-V3, Kimi-K2,
MiniMax-M2 and Qwen3 `-FP8` ship (e4m3 `weight` + float32 `weight_scale_inv` per block of every
quantised linear layer, `quantization_config` in config.json), and the HF model holding exactly the
dequantised weights, the reference tokenmill's logits are compared with."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from tokenmill.ops.fp8_format import dequantize_weight_blocks, quantize_weight_blocks


def _quantised(name: str, tensor: torch.Tensor, keep: tuple[str, ...]) -> bool:
    """HF's FP8 conversion: the weights of linear layers (2-D `.weight`s) except embeddings, the LM
    head and the modules kept unquantised."""
    if tensor.dim() != 2 or not name.endswith(".weight"):
        return False
    module = name.removesuffix(".weight")
    return not (module.endswith(("embed_tokens", "lm_head", "norm")) or any(k in module for k in keep))


def save_block_fp8(model: torch.nn.Module, folder: str, block=(128, 128), keep: tuple[str, ...] = (),
                   extra_config: dict | None = None) -> torch.nn.Module:
    """Write `model` (an HF model) to `folder` as a block-FP8 checkpoint; set the model's weights
    to their dequantised values (in place), so it is the reference for the checkpoint. Modules
    whose names contain a string of `keep` stay in the model's dtype (and are listed in
    `modules_to_not_convert`)."""
    tensors = {}
    state = model.state_dict()
    tied = getattr(model.config, "tie_word_embeddings", False)
    with torch.no_grad():
        for name, tensor in state.items():
            if tied and name == "lm_head.weight":
                continue
            if _quantised(name, tensor, keep):
                w_q, scale = quantize_weight_blocks(tensor, block)
                tensors[name] = w_q
                tensors[name.removesuffix("weight") + "weight_scale_inv"] = scale
                tensor.copy_(dequantize_weight_blocks(w_q, scale, block, tensor.dtype))
            else:
                tensors[name] = tensor.detach().clone().contiguous()
    model.config.save_pretrained(folder)
    save_file(tensors, os.path.join(folder, "model.safetensors"))
    path = os.path.join(folder, "config.json")
    config = json.load(open(path))
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block), **(extra_config or {})}
    if keep:
        config["quantization_config"]["modules_to_not_convert"] = list(keep)
    json.dump(config, open(path, "w"), indent=2)
    return model
