"""Weight sources: HF safetensors shards (memory-mapped), GGUF (dequantized), or dummy random.

Every source yields `(hf_name, tensor)` pairs; the model's `load_weights` routes each one through
the `weight_loader` of its parameter's module, which is where tensor-parallel sharding happens, so
no rank ever needs the whole tensor set in memory at once.
"""

from __future__ import annotations

import glob
import os
from typing import Any, Iterator

import torch

from tokenmill.model.loader.model_source import ModelSource


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
