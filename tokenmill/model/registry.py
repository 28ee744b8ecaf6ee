"""Model classes keyed by the HF `architectures` name, and the function that builds and loads one."""

from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tokenmill.config.engine_config import EngineConfig
from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.build_context import BuildContext, building
from tokenmill.model.layers.quantization.not_converted import keep_unquantized_modules
from tokenmill.model.layers.vocab_embedding import quantized_table_type
from tokenmill.model.models.bert import BertModel
from tokenmill.model.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from tokenmill.model.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from tokenmill.model.models.minimax import MiniMaxForCausalLM
from tokenmill.model.models.minimax_m2 import MiniMaxM2ForCausalLM
from tokenmill.model.models.mixtral import MixtralForCausalLM
from tokenmill.model.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    # Encoders (embedding models: `task="embed"`).
    "BertModel": BertModel,
    "BertForMaskedLM": BertModel,
    "BertForPreTraining": BertModel,
    # Decoders.
    "DeepseekV2ForCausalLM": DeepseekV2ForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekV3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
    "MiniMaxM2ForCausalLM": MiniMaxM2ForCausalLM,
    "MiniMaxForCausalLM": MiniMaxForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ValueError(f"architecture {architecture!r} is not supported; supported: "
                         f"{', '.join(sorted(MODEL_REGISTRY))}") from None


class _WeightsOnMeta(TorchFunctionMode):
    """`torch.empty`, which layers allocate their weights with, makes meta tensors (a shape, no
    memory); every other call runs as usual (the small host tensors a layer computes when built)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.empty:
            kwargs["device"] = torch.device("meta")
        return func(*args, **kwargs)


def model_skeleton(config: EngineConfig, tp: TensorParallelGroup) -> nn.Module:
    """The model of `config` as `tp`'s rank would build it, its weights on the meta device
    (shapes and dtypes, no memory): for sizing a model before loading it."""
    cpu = torch.device("cpu")
    with _WeightsOnMeta():
        return _instantiate(config, cpu, TensorParallelGroup(tp.rank, tp.world_size, cpu))


def weight_bytes_per_rank(config: EngineConfig, tp: TensorParallelGroup) -> int:
    """Bytes of `tp`'s rank's parameters and buffers in the model dtype, counted on its skeleton,
    so the memory planner can refuse a model that cannot fit before a byte of it is loaded."""
    model = model_skeleton(config, tp)
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _instantiate(config: EngineConfig, device: torch.device, tp: TensorParallelGroup) -> nn.Module:
    model_config = config.model
    cls = model_class(model_config.architecture)
    if getattr(cls, "is_encoder", False) != model_config.is_encoder:
        kind = "an embedding model (task='embed')" if model_config.is_encoder else "a generation model"
        raise ValueError(f"{model_config.architecture} cannot be served as {kind}")
    quant = model_config.quantization
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(model_config.dtype)
    try:
        with torch.device(device), building(BuildContext(device, config.kernels, tp, quant)):
            model = cls(model_config.hf_config)
            if quant is not None:
                keep_unquantized_modules(model, quant)
            return model
    finally:
        torch.set_default_dtype(default_dtype)


@torch.no_grad()
def build_model(config: EngineConfig, tp: TensorParallelGroup) -> nn.Module:
    """Instantiate the model of `config` on its device, sharded for `tp`, and load its weights."""
    from tokenmill.model.loader.weights import init_dummy_weights, iter_weights, load_weights

    model_config = config.model
    model = _instantiate(config, config.device, tp)
    if config.load_format == "dummy":
        init_dummy_weights(model, model_config.seed)
    else:
        load_weights(model, iter_weights(model_config.source, model_config.hf_config, config.kernels.gguf_weight_type,
                                         quantized_table_type(config.kernels)))
    process_weights_after_loading(model)
    return model.eval()


def process_weights_after_loading(model: nn.Module) -> None:
    """Let every layer derive what it keeps beside its weights (a packed CPU copy, ...) from the
    weights now loaded; run again after an in-place weight update, so each layer's method must
    recompute from its parameters, not transform them, and refill a derived tensor in place (the
    decode CUDA graphs captured its address; an update that moves no parameter keeps them)."""
    for module in model.modules():
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()
