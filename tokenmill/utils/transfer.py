"""Small host-to-device copies that never make the host wait for the GPU.

A copy from pageable host memory to the GPU may synchronise with its stream before it starts
(CUDA's API synchronisation rules: the driver stages pageable bytes through pinned memory), even
with `non_blocking=True`. With async scheduling the stream still runs the previous step then, so
such a copy would hold the host until that step ends. Staged through pinned memory (PyTorch's
caching host allocator, which keeps a block until the copies that read it are done) the copy is
only enqueued. For the steady per-step inputs the runner keeps persistent pinned buffers instead
(`worker/input_buffers.py`); this is for the occasional list (sampler rows, penalties, prefix tables).
"""

from __future__ import annotations

import numpy as np
import torch


def to_device(values: list | np.ndarray, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or array) as a tensor on `device`, enqueued after the stream's work."""
    host = torch.from_numpy(values).to(dtype) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def index_tensor(indices: list[int], device: torch.device) -> torch.Tensor:
    """int64 indices on `device` (for index_select / index_copy_)."""
    return to_device(indices, torch.long, device)
