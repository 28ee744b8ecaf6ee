"""Sleep mode: hand a rank's device memory back while a trainer uses the GPU, and take it again.

Two things hold the memory: the weights (the model's parameters) and the cache of every
`CacheLayer` (KV blocks, MLA latent rows, linear-attention state slots), with the decode CUDA
graphs (they bake in the pool's and the weights' addresses, and own a memory pool of their own)
or the compiled CPU forward (the weights frozen into it). `WeightOffload` empties every parameter
(`param.data` becomes a 0-element tensor, so the caching allocator frees the storage once nothing
else refers to it), keeping a host copy at level 1 (pinned on CUDA, for a fast copy back) and none
at level 2. Waking puts tensors of the recorded shapes back: the copies, or uninitialised memory
that a weight update must fill. The runner drops and rebuilds the caches and the graphs
(`ModelRunner.release_kv_cache`, `capture_cuda_graphs`).

Parameters are emptied in place, so the modules (and tied weights, one Parameter shared by two
modules) keep pointing at the same objects. Buffers (rotary tables) are not weights and stay;
tensors a layer derived from its weights (`drop_derived_weights`) are dropped with them.
"""

from __future__ import annotations

import gc
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class WeightOffload:
    """The parameters of `model` while it sleeps: shapes, dtypes and (level 1) host copies."""

    def __init__(self, model: nn.Module, device: torch.device, keep_copy: bool) -> None:
        self.device = device
        self.kept = keep_copy
        self.shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        self.copies: dict[str, torch.Tensor] = {}
        pin = device.type == "cuda"
        for name, param in model.named_parameters():
            self.shapes[name] = (param.shape, param.dtype)
            if keep_copy:
                copy = torch.empty(param.shape, dtype=param.dtype, device="cpu", pin_memory=pin)
                copy.copy_(param.data, non_blocking=pin)
                self.copies[name] = copy
        if pin:
            torch.cuda.synchronize(device)  # the copies are complete before the storage goes
        for name, param in model.named_parameters():
            param.data = torch.empty(0, dtype=param.dtype, device=device)
        # Copies the layers derived from their weights (a dequantised fp8 matrix, a packed CPU
        # weight) go too; `process_weights_after_loading` derives them again on waking.
        for module in model.modules():
            if hasattr(module, "drop_derived_weights"):
                module.drop_derived_weights()

    def restore(self, model: nn.Module) -> None:
        """Parameters back on the device: the host copies, or (level 2) uninitialised storage."""
        for name, param in model.named_parameters():
            shape, dtype = self.shapes[name]
            copy = self.copies.pop(name, None)
            if copy is None:
                param.data = torch.empty(shape, dtype=dtype, device=self.device)
            else:
                param.data = copy.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def return_device_memory(device: torch.device) -> None:
    """Give freed blocks back to the device (the caching allocator keeps them otherwise)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
