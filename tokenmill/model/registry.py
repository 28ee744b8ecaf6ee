"""Model classes keyed by the HF `architectures` name, and the function that builds and loads one."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.attention.backend import get_backend
from tokenmill.model.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}") from None


@torch.no_grad()
def build_model(config) -> nn.Module:
    """Instantiate the model of `config` (an EngineConfig) on its device and load its weights."""
    from tokenmill.model.loader.weights import init_dummy_weights, iter_weights

    model_config = config.model
    cls = model_class(model_config.architecture)
    backend = get_backend(config.attention_backend)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(config.device):
            model = cls(model_config.hf_config, backend)
    finally:
        torch.set_default_dtype(default_dtype)
    # The RoPE cache stays float32 for accuracy whatever the model dtype.
    for module in model.modules():
        if hasattr(module, "cos_sin_cache"):
            module.cos_sin_cache = module.cos_sin_cache.float()
    if config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        model.load_weights(iter_weights(model_config.source, model_config.hf_config))
    if config.device.type == "cpu" and hasattr(model, "pack_for_cpu"):
        model.pack_for_cpu()
    return model.eval()
