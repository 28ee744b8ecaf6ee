"""`CacheLayer`: a layer that keeps memory per request from one step to the next, allocated by the
model runner for every such layer of the model, in the order of `model.modules()`:

- paged KV blocks (`Attention`): `kv_cache_bytes_per_block` bytes for each block of the pool, the
  block ids handed out by `core/kv_cache_manager.py`;
- state slots (`LightningAttention`, hybrid models' linear layers): `state_bytes_per_slot` bytes for
  each slot, one per running request plus prefix-cache checkpoints (`core/state_cache.py`).

The runner sizes the pool from the sum over layers (the worker charges the slots first, then fills
the rest of the memory with blocks), allocates each layer's part with `allocate_kv_cache`, and hands
the model the list of what each layer returned, in the same order.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import nn


class CacheLayer(nn.Module):
    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        """Bytes this layer stores per KV block of `block_size` tokens (0: none)."""
        return 0

    def state_bytes_per_slot(self) -> int:
        """Bytes this layer stores per state slot (0: none)."""
        return 0

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                          num_state_slots: int = 0) -> Any:
        """This layer's cache for a pool of `num_blocks` blocks and `num_state_slots` slots; the
        model's forward receives it back for this layer."""
