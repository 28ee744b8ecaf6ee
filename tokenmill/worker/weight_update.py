"""In-place weight updates of a running model: new tensors through the loader's own name mapping.

Every source (a checkpoint on disk, tensors in the driver's process, CUDA IPC buffers, a trainer's
broadcast) ends in `InPlaceUpdate.load`, which routes `(hf_name, tensor)` pairs through
`model/loader/weights.load_weights` (the model class's `stacked_params` and each layer's
`weight_loader`), so a tensor-parallel rank takes its shard and merged layouts (q/k/v into qkv,
gate/up, stacked experts) are filled as at load time; any subset of the checkpoint may be given.
The loaders copy into the existing parameters, so the CUDA graphs (which bake in their addresses)
stay valid; should a layer's post-load step move a parameter, the graphs are recaptured.

Updates run between engine steps, on every rank (the executor sees to that): no step ever sees a
half-updated model. A failing update (an unknown name, a wrong shape) raises after loading the
tensors before it: the model is then partly updated, so retry with a correct set.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Iterator

import torch

from tokenmill.model.loader.weights import iter_safetensors_weights, load_weights
from tokenmill.model.registry import process_weights_after_loading


def iter_checkpoint(path: str, hf_config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors folder or a GGUF file, with HF names."""
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded) and expanded.endswith(".gguf"):
        from tokenmill.config.gguf_weights import iter_gguf_weights
        return iter_gguf_weights(expanded, hf_config)
    if os.path.isdir(expanded):
        return iter_safetensors_weights(expanded)
    raise FileNotFoundError(f"{path}: not a folder of *.safetensors files nor a .gguf file")


def check_updatable(config) -> None:
    """Refuse an update into weights the engine transformed at load, where a checkpoint tensor can
    no longer be copied into its parameter: online fp8 (quantised from the checkpoint's model-dtype
    weights; a block-FP8 checkpoint's own e4m3 weights and scales load in place) and GGUF blocks
    repacked for the CPU kernels."""
    quant = config.model.quantization
    if quant is not None and not quant.from_checkpoint:
        raise ValueError("in-place weight updates are not supported with quantization='fp8' applied at load "
                         "(the layers hold weights quantised from the checkpoint's): run unquantised, or from "
                         "a block-FP8 checkpoint, whose e4m3 weights and scales update in place")
    if config.kernels.gguf_weight_type is not None:
        raise ValueError("in-place weight updates are not supported with quantization='gguf' (the GGUF blocks "
                         "are repacked for the CPU kernels at load): load the GGUF file dequantised "
                         "(without --quantization gguf) to update its weights")


class InPlaceUpdate:
    """One update: `load` any number of batches, then `finish` (the layers' post-load step,
    graphs recaptured if a parameter moved). Use as a context manager."""

    def __init__(self, runner) -> None:
        check_updatable(runner.config)
        self.runner = runner
        self.model = runner.model
        self._addresses = {name: p.data_ptr() for name, p in self.model.named_parameters()}
        self.loaded: set[str] = set()

    def load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        self.loaded |= load_weights(self.model, iter(weights), require_all=False)

    def finish(self) -> None:
        process_weights_after_loading(self.model)
        moved = any(p.data_ptr() != self._addresses[name] for name, p in self.model.named_parameters())
        if self.runner.graphs_ready and (moved or self.runner.config.kernels.cpu_compile):
            self.runner.recapture_cuda_graphs()
        if self.runner.device.type == "cuda":
            torch.cuda.synchronize(self.runner.device)

    def __enter__(self) -> "InPlaceUpdate":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.finish()  # also after a failure: derived state follows whatever was loaded
