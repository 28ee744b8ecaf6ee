"""The interface of an MLA attention backend (`mla.py` is the layer that calls it), the latent
cache's layout, and the selector by engine backend name.

The latent cache of one layer is `[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]`: per
token one row, the normalised latent `c_kv` then the rotated rope key shared by every head (576
values for DeepSeek-V3), in the model dtype or float8_e4m3fn (one scale per layer, the format of
`ops/kv_quant.py`). Every tensor-parallel rank holds the whole row (the latent is not split by
head). Metadata is the dense backends' (`backend.AttentionMetadata`, built by the engine
backend's own builder): MLA reads the same slot mapping, block table and lengths.

A backend does three things for the layer:
- `rope_and_write`: rotate q's rope part and the rope key, write `[latent | rope key]` rows;
- `decode`: one-token queries, up-projections absorbed (`mla.py`): attention in latent space;
- `prefill`: prefills and chunks attend in the expanded space (per-head keys and values from the
  latent through `kv_b_proj`), the cached prefix read back from the cache and expanded.

`selector.mla_backend_class(name)` picks the implementation by the engine's backend name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.layers.rotary_embedding import RotaryInputs
from tokenmill.ops.kv_quant import as_storage, read_kv

# latent [n, kv_lora_rank] -> per-head [n, num_heads, qk_nope_head_dim + v_head_dim] (kv_b_proj).
ExpandLatent = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class MLADims:
    num_heads: int  # this rank's
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values per token in the latent cache."""
        return self.kv_lora_rank + self.qk_rope_head_dim


class MLABackend(ABC):
    """One instance per MLA layer; `scale` is the softmax scale of the q.k products."""

    def __init__(self, dims: MLADims, scale: float, interleaved_rope: bool) -> None:
        self.dims = dims
        self.scale = scale
        self.interleaved_rope = interleaved_rope

    @abstractmethod
    def rope_and_write(
        self,
        q: torch.Tensor,  # [T, heads, qk_nope + qk_rope]; the rope part is rotated
        k_pe: torch.Tensor,  # [T, qk_rope], not yet rotated
        latent: torch.Tensor,  # [T, kv_lora_rank], normalised
        cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [>= T] int64, -1 = skip
        rope: RotaryInputs,
        kv_scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(q, k_pe) rotated (in place or as copies) after the step's rows are in the cache."""

    @abstractmethod
    def decode(
        self,
        q_latent: torch.Tensor,  # [num_decodes, heads, kv_lora_rank]: q_nope through W_UK
        q_pe: torch.Tensor,  # [num_decodes, heads, qk_rope], rotated
        cache: torch.Tensor,
        meta: AttentionMetadata,
        out: torch.Tensor,  # [num_decodes, heads, kv_lora_rank], written
        kv_scale: float,
    ) -> None:
        """Latent attention of the step's decode tokens (the first `num_decodes`)."""

    @abstractmethod
    def prefill(
        self,
        q: torch.Tensor,  # [T, heads, qk_head_dim], rope part rotated
        latent: torch.Tensor,  # [T, kv_lora_rank]
        k_pe: torch.Tensor,  # [T, qk_rope], rotated
        cache: torch.Tensor,
        meta: AttentionMetadata,
        expand: ExpandLatent,
        kv_scale: float,
        out: torch.Tensor,  # [T, heads, v_head_dim]; the prefill requests' rows are written
    ) -> None:
        """Causal attention of the prefill requests (after the decodes) over their cached prefix
        (from the cache) and their own new tokens (from latent / k_pe: exact even in fp8)."""


def gather_latent_rows(cache: torch.Tensor, block_ids: torch.Tensor, kv_scale: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """The cache rows of whole blocks `block_ids`, in `dtype` (fp8 dequantized):
    [len(block_ids) * block_size, cache_width]."""
    rows = as_storage(cache).index_select(0, block_ids).view(cache.dtype)
    return read_kv(rows.reshape(-1, cache.shape[-1]), kv_scale, dtype)


def host_tensor(host: torch.Tensor | None, device_tensor: torch.Tensor) -> torch.Tensor:
    """The metadata's host copy where the runner gave one (every eager step), else a device read."""
    return host if host is not None else device_tensor.cpu()
