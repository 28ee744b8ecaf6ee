"""`Attention`: the layer a model calls with its projected q, k and v. It owns the backend chosen
for the engine (`--attention-backend`), the layer's fp8 KV-cache scales and, as a `CacheLayer`
(`cache_layer.py`), the layout of its share of the paged KV cache (K and V per head here; one
latent row per token for MLA, `mla.py`).

q and k reach it as projected: it normalises each head (the model's per-head q/k RMSNorm, if it
has one), then the backend rotates them, writes K/V and attends. Normalisation, rotation and
cache write are one kernel on the Triton backend; the others take the norms applied first."""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.attention.cache_layer import CacheLayer
from tokenmill.model.attention.selector import backend_class
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.rotary_embedding import RotaryInputs


class Attention(CacheLayer):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, qk_norm: tuple[RMSNorm, RMSNorm] | None = None) -> None:
        """`num_heads` / `num_kv_heads`: this rank's. `sliding_window`: the query at position p
        attends the keys in (p - sliding_window, p] (None: the whole context). `qk_norm`:
        (q_norm, k_norm), RMSNorms over each head of q and of k (Qwen3's), applied before the
        rotation; the model keeps them registered under their checkpoint names."""
        super().__init__()
        context = build_context()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.impl = backend_class(context.kernels.attention_backend)(num_heads, num_kv_heads, head_dim, scale,
                                                                     sliding_window)
        # The norms this layer applies before the backend, unless the backend fuses them into its
        # own kernels. Held in a tuple, so that they are not registered a second time here.
        self._qk_norm_first = None if qk_norm is None or self.impl.fuse_qk_norm(*qk_norm) else qk_norm
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
        if self._qk_norm_first is not None:
            q_norm, k_norm = self._qk_norm_first
            q, k = q_norm(q), k_norm(k)
        out = self.impl.forward(q, k, v, kv_cache, meta, self.k_scale, self.v_scale, rope)
        return out.reshape(out.shape[0], -1)
