"""`MLAAttention`: multi-head latent attention (DeepSeek-V2/V3, Kimi-K2), the layer between the
model's projections and its output projection.

Per token the model computes q ([heads, qk_nope + qk_rope]), a normalised latent `c_kv`
([kv_lora_rank]) and one rope key shared by every head ([qk_rope]). Head h's key and value are
`[c_kv W_UK[h] | rope key]` and `c_kv W_UV[h]`, where `kv_b_proj` stacks W_UK and W_UV per head.
The cache keeps only `[c_kv | rope key]` (`mla_backend.py`: 576 values a token for DeepSeek-V3,
against 128 heads x 2 x 192 expanded).

- Decode absorbs the up-projections: q_nope W_UK[h]^T is a query in latent space, so a decode
  token attends over the cached rows directly (multi-query attention over rows of kv_lora_rank +
  qk_rope values, values = the latents), and its latent output goes through W_UV[h] afterwards.
  W_UK and W_UV are views of `kv_b_proj`'s weight: no second copy. An fp8 `kv_b_proj` (block-FP8
  checkpoints, online fp8) is dequantised once after loading for them, in the model dtype.
- Prefill expands: keys and values per head from the latents through `kv_b_proj` (cheaper than
  absorbing when many queries share a key), the cached prefix expanded from the cache.

`kv_b_proj` is the caller's layer (HF name `self_attn.kv_b_proj`), shared with this one; its
parameters are named where the caller registers it first.
"""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.cache_layer import CacheLayer
from tokenmill.model.attention.mla_backend import MLADims
from tokenmill.model.attention.selector import mla_backend_class
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear import ColumnParallelLinear
from tokenmill.model.layers.quantization.fp8 import Fp8LinearMethod
from tokenmill.model.layers.rotary_embedding import RotaryInputs


class MLAAttention(CacheLayer):
    def __init__(self, dims: MLADims, scale: float, kv_b_proj: ColumnParallelLinear,
                 interleaved_rope: bool) -> None:
        """`dims.num_heads`: this rank's; `kv_b_proj` holds this rank's heads, [heads * (qk_nope +
        v_head_dim), kv_lora_rank]; `interleaved_rope`: DeepSeek's pairwise rotary layout."""
        super().__init__()
        self.dims = dims
        self.kv_b_proj = kv_b_proj
        self.impl = mla_backend_class(build_context().kernels.attention_backend)(dims, scale, interleaved_rope)
        # Per-layer fp8 scale of the latent cache (kv_cache_dtype="fp8"): 1.0, uncalibrated, as
        # for the dense layers.
        self.kv_scale = 1.0
        self.dtype = torch.get_default_dtype()  # the model's (set while it is built)
        self._w_kv_b: torch.Tensor | None = None  # kv_b_proj's weight dequantised, where it is fp8

    def process_weights_after_loading(self) -> None:
        """The absorbed products read `kv_b_proj`'s weight in the model dtype: an fp8 one is
        dequantised here, once. (`kv_b_proj` is registered before this layer, so it has been
        processed, e.g. quantised by online fp8, by the time this runs.)"""
        method = self.kv_b_proj.method
        if isinstance(method, Fp8LinearMethod):
            weight = method.dequantized_weight(self.kv_b_proj, self.dtype)
            if self._w_kv_b is not None and self._w_kv_b.shape == weight.shape:
                # After an in-place weight update: the decode CUDA graphs read this storage, and
                # updates that leave the parameters where they were do not recapture them.
                self._w_kv_b.copy_(weight)
            else:
                self._w_kv_b = weight

    def drop_derived_weights(self) -> None:
        self._w_kv_b = None

    # ----- the layer's share of the paged KV cache -----
    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return block_size * self.dims.cache_width * torch.empty((), dtype=dtype).element_size()

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype,
                          device: torch.device, num_state_slots: int = 0) -> torch.Tensor:
        """[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
        return torch.zeros((num_blocks, block_size, self.dims.cache_width), dtype=dtype, device=device)

    # ----- the up-projections -----
    def _absorbed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK [heads, qk_nope, rank], W_UV [heads, v_head_dim, rank]): views of kv_b_proj's weight."""
        d = self.dims
        weight = self.kv_b_proj.weight if self._w_kv_b is None else self._w_kv_b
        weight = weight.view(d.num_heads, d.qk_nope_head_dim + d.v_head_dim, d.kv_lora_rank)
        return weight[:, : d.qk_nope_head_dim], weight[:, d.qk_nope_head_dim:]

    def _expand(self, latent: torch.Tensor) -> torch.Tensor:
        """[n, rank] -> [n, heads, qk_nope + v_head_dim]: per-head k_nope | v."""
        d = self.dims
        return self.kv_b_proj(latent).view(-1, d.num_heads, d.qk_nope_head_dim + d.v_head_dim)

    def forward(self, q: torch.Tensor, latent: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, rope: RotaryInputs) -> torch.Tensor:
        """q [T, heads, qk_nope + qk_rope], latent [T, kv_lora_rank] (normalised), k_pe [T, qk_rope]
        (not rotated) -> [T, heads * v_head_dim]. q and k_pe may be rotated in place."""
        d = self.dims
        q, k_pe = self.impl.rope_and_write(q, k_pe, latent, kv_cache, meta.slot_mapping, rope, self.kv_scale)
        out = q.new_empty(q.shape[0], d.num_heads, d.v_head_dim)
        num_decodes = meta.num_decodes
        if num_decodes:
            w_uk, w_uv = self._absorbed()
            q_dec = q[:num_decodes]
            # [heads, B, nope] @ [heads, nope, rank]: each head's query in latent space.
            q_latent = torch.bmm(q_dec[..., : d.qk_nope_head_dim].transpose(0, 1), w_uk).transpose(0, 1)
            out_latent = q.new_empty(d.num_heads, num_decodes, d.kv_lora_rank)
            self.impl.decode(q_latent, q_dec[..., d.qk_nope_head_dim:], kv_cache, meta,
                             out_latent.transpose(0, 1), self.kv_scale)
            # [heads, B, rank] @ [heads, rank, v]: each head's value projection after attention.
            out[:num_decodes] = torch.bmm(out_latent, w_uv.transpose(1, 2)).transpose(0, 1)
        if meta.num_prefills:
            self.impl.prefill(q, latent, k_pe, kv_cache, meta, self._expand, self.kv_scale, out)
        return out.view(q.shape[0], -1)
