"""`Attention`: the layer a model calls with its projected q, k and v. It owns the backend chosen
for the engine (`--attention-backend`), the layer's fp8 KV-cache scales and, as a `CacheLayer`
(`cache_layer.py`), the layout of its share of the paged KV cache (K and V per head here; one
latent row per token for MLA, `mla.py`)."""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.attention.cache_layer import CacheLayer
from tokenmill.model.attention.selector import backend_class
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.rotary_embedding import RotaryInputs


class Attention(CacheLayer):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        """`num_heads` / `num_kv_heads`: this rank's. `sliding_window`: the query at position p
        attends the keys in (p - sliding_window, p] (None: the whole context)."""
        super().__init__()
        context = build_context()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.impl = backend_class(context.kernels.attention_backend)(num_heads, num_kv_heads, head_dim, scale,
                                                                     sliding_window)
        # Per-tensor fp8 KV-cache scales (used only with kv_cache_dtype="fp8"): 1.0, uncalibrated,
        # as vLLM defaults to. A checkpoint with calibrated scales would set them here.
        self.k_scale = 1.0
        self.v_scale = 1.0

    # ----- the layer's share of the paged KV cache -----
    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        if not self.impl.uses_kv_cache:
            return 0
        return 2 * block_size * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                          device: torch.device, num_state_slots: int = 0) -> KVCache | None:
        """(k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim]; None for a
        backend that keeps no cache (encoders)."""
        if not self.impl.uses_kv_cache:
            return None
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata, rope: RotaryInputs | None = None) -> torch.Tensor:
        """q [T, heads, head_dim], k / v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        out = self.impl.forward(q, k, v, kv_cache, meta, self.k_scale, self.v_scale, rope)
        return out.reshape(out.shape[0], -1)
