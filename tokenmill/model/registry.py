"""Model classes keyed by the HF `architectures` name, and the function that builds and loads one."""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config.engine_config import EngineConfig
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.build_context import BuildContext, building
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
def build_model(config: EngineConfig, tp: TensorParallelGroup) -> nn.Module:
    """Instantiate the model of `config` on its device, sharded for `tp`, and load its weights."""
    from tokenmill.model.loader.weights import init_dummy_weights, iter_weights, load_weights

    model_config = config.model
    cls = model_class(model_config.architecture)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(config.device), building(BuildContext(config.device, config.kernels, tp)):
            model = cls(model_config.hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        load_weights(model, iter_weights(model_config.source, model_config.hf_config))
    process_weights_after_loading(model)
    return model.eval()


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer derive what it keeps beside its weights (a packed CPU copy, ...) from the
    weights now loaded; run again after an in-place weight update, so each layer's method must
    recompute from its parameters, not transform them."""
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
