"""Weight sources: HF safetensors shards (memory-mapped), GGUF (dequantized), or dummy random.

Every source yields `(hf_name, tensor)` pairs; `load_weights` routes each one through
the `weight_loader` of its parameter's module, which is where tensor-parallel sharding happens, so
no rank ever needs the whole tensor set in memory at once.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import torch

from tokenmill.config.model_source import ModelSource
from tokenmill.model.loader.expert_weights import expert_weight
from tokenmill.ops.fp8_format import FP8_DTYPE, FP8_MAX


def iter_safetensors_weights(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors files (use --load-format dummy "
                                "for random weights)")
    for file in files:
        try:
            handle = safe_open(file, framework="pt")
        except Exception as exc:
            raise ValueError(f"{file} is not a readable safetensors file ({type(exc).__name__})") from None
        with handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def iter_weights(source: ModelSource, hf_config: Any, gguf_weight_type: str | None = None,
                 gguf_embedding_type: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`gguf_weight_type` / `gguf_embedding_type`: GGUF linear weights / embedding tables of this
    block type come as their raw rows."""
    if source.load_format == "gguf":
        from tokenmill.config.gguf_weights import iter_gguf_weights
        return iter_gguf_weights(source.path, hf_config, gguf_weight_type, gguf_embedding_type)
    if source.load_format == "safetensors":
        return iter_safetensors_weights(source.path)
    raise ValueError(f"no weight iterator for load_format {source.load_format!r}")


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights at the real shapes, for benchmarks with no download.

    Small uniform values keep activations finite through many layers; norm weights are 1 like a
    freshly initialised model. fp8 weights are uniform in [-448, 448] with every scale
    (`weight_scale_inv`) 0.02 / 448, so they dequantise to the same range. Generated on the
    parameter's own device (fast on a GPU).
    """
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif param.dtype == FP8_DTYPE:
            param.copy_(torch.empty(param.shape, device=param.device).uniform_(-FP8_MAX, FP8_MAX, generator=generator))
        elif name.endswith("weight_scale_inv"):
            param.fill_(0.02 / FP8_MAX)
        else:
            param.uniform_(-0.02, 0.02, generator=generator)


def _weight_loader_of(model: torch.nn.Module, name: str):
    """The `weight_loader` of the module owning parameter `name` (where sharding happens), or None.
    Looked up, not stored on the parameter: a bound method there would tie parameter and module in a
    cycle through the tensor, which Python's collector does not free (a shut-down engine's weights
    would stay on the GPU)."""
    return getattr(model.get_submodule(name.rpartition(".")[0]), "weight_loader", None)


@torch.no_grad()
def load_weights(model: torch.nn.Module, weights: Iterator[tuple[str, torch.Tensor]],
                 require_all: bool = True) -> set[str]:
    """Route each HF tensor to its (possibly merged, possibly sharded) parameter.

    The model class declares its name mapping: `stacked_params` ((merged fragment, HF fragment,
    shard id), e.g. q/k/v into `qkv_proj`), `ignored_weights` (fragments of tensors it recomputes
    or does not use), optionally `skip_weight(name)` and `hf_name_prefix` (dropped from names).
    Routed experts' matrices go to their `FusedMoE` layer's stacked parameters through the shared
    table of `expert_weights.py`. Every parameter must be loaded exactly from the checkpoint:
    unknown tensors, missing parameters and missing experts are errors, not silent gaps; fp8
    tensors load only into fp8 parameters (with their scales), never cast. `require_all=False`
    (an in-place weight update) takes any subset of the checkpoint. Returns the parameters loaded.
    """
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params", ())
    ignored = getattr(model, "ignored_weights", ())
    skip = getattr(model, "skip_weight", lambda name: False)
    prefix = getattr(model, "hf_name_prefix", None)  # dropped where present (a head class's checkpoint)
    loaded: set[str] = set()

    def param_of(target: str, name: str) -> torch.nn.Parameter:
        if target not in params:
            raise ValueError(f"checkpoint tensor {name} has no matching parameter in {type(model).__name__}")
        return params[target]

    def as_param_dtype(name: str, tensor: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
        # fp8 weights mean nothing without their scales: never cast into or out of fp8.
        if (tensor.dtype == FP8_DTYPE) != (param.dtype == FP8_DTYPE):
            if tensor.dtype == FP8_DTYPE:
                raise ValueError(f"checkpoint tensor {name} is float8_e4m3fn, but the layer is not quantised: "
                                 "the checkpoint's config.json needs its quantization_config (or the module is "
                                 "in modules_to_not_convert)")
            raise ValueError(f"checkpoint tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, but its "
                             "layer holds fp8 weights (quantization_config); a module the checkpoint keeps "
                             "unquantised must be listed in modules_to_not_convert")
        return tensor.to(param.dtype)

    for name, tensor in weights:
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
        if any(fragment in name for fragment in ignored) or skip(name):
            continue
        expert = expert_weight(name)
        if expert is not None:
            param = param_of(expert.param_name, name)
            _weight_loader_of(model, expert.param_name)(param, as_param_dtype(name, tensor, param),
                                                        expert.shard_id, expert.expert_id)
            loaded.add(expert.param_name)
            continue
        for merged, part, shard_id in stacked:
            if f".{part}." in name:
                target = name.replace(part, merged)
                param = param_of(target, name)
                _weight_loader_of(model, target)(param, as_param_dtype(name, tensor, param), shard_id)
                loaded.add(target)
                break
        else:
            param = param_of(name, name)
            loader = _weight_loader_of(model, name)
            if loader is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                     f"parameter shape {tuple(param.shape)}")
                param.data.copy_(as_param_dtype(name, tensor, param))
            else:
                loader(param, as_param_dtype(name, tensor, param))
            loaded.add(name)
    missing = set(params) - loaded
    if missing and require_all:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    for module_name, module in model.named_modules():
        unloaded = module.unloaded_weights() if hasattr(module, "unloaded_weights") else []
        if unloaded and require_all:
            raise ValueError(f"checkpoint is missing {len(unloaded)} expert matrices of {module_name}, "
                             f"e.g. {unloaded[:3]}")
    return loaded
