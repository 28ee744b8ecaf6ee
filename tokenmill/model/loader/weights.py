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


def iter_weights(source: ModelSource, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if source.load_format == "gguf":
        from tokenmill.model.loader.gguf_loader import iter_gguf_weights
        return iter_gguf_weights(source.path, hf_config)
    if source.load_format == "safetensors":
        return iter_safetensors_weights(source.path)
    raise ValueError(f"no weight iterator for load_format {source.load_format!r}")


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights at the real shapes, for benchmarks with no download.

    Small uniform values keep activations finite through many layers; norm weights are 1 like a
    freshly initialised model. Generated on the parameter's own device (fast on a GPU).
    """
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
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
    shard id), e.g. q/k/v into `qkv_proj`), `ignored_weights` (fragments of tensors it recomputes)
    and optionally `skip_weight(name)`. Every parameter must be loaded exactly from the checkpoint:
    unknown tensors and missing parameters are errors, not silent gaps. `require_all=False`
    (an in-place weight update) takes any subset of the checkpoint. Returns the parameters loaded.
    """
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params", ())
    ignored = getattr(model, "ignored_weights", ())
    skip = getattr(model, "skip_weight", lambda name: False)
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(fragment in name for fragment in ignored) or skip(name):
            continue
        for merged, part, shard_id in stacked:
            if f".{part}." in name:
                target = name.replace(part, merged)
                if target not in params:
                    raise ValueError(f"checkpoint tensor {name} has no matching parameter in {type(model).__name__}")
                param = params[target]
                _weight_loader_of(model, target)(param, tensor.to(param.dtype), shard_id)
                loaded.add(target)
                break
        else:
            if name not in params:
                raise ValueError(f"checkpoint tensor {name} has no matching parameter in {type(model).__name__}")
            param = params[name]
            loader = _weight_loader_of(model, name)
            if loader is None:
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                     f"parameter shape {tuple(param.shape)}")
                param.data.copy_(tensor)
            else:
                loader(param, tensor.to(param.dtype))
            loaded.add(name)
    missing = set(params) - loaded
    if missing and require_all:
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return loaded
