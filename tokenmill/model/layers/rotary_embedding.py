"""Rotary position embedding (RoPE), neox style (HF's `rotate_half`), with the scalings HF configs
name: default, linear, llama3.

One `RotaryEmbedding` per model holds the `[max_position, rotary_dim]` cos|sin table (float32,
computed as HF computes it, so greedy tokens match bit for bit). Each step the model calls
`prepare(positions)` once; every attention layer then rotates its q and k with that
`RotaryInputs`, either through `rotate_neox` (the reference) or fused into its KV-cache write
(the Triton backend reads `positions` and the table itself).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.model.custom_op import CustomOp


@dataclass(frozen=True, slots=True)
class RotaryInputs:
    """One step's rotary embedding. `cos` / `sin` ([num_tokens, 1, rotary_dim / 2], the model dtype)
    are looked up once per step for the reference path; None where the kernels read the table."""

    positions: torch.Tensor  # [num_tokens] int64
    cos_sin_cache: torch.Tensor  # [max_position, rotary_dim] float32: cos | sin
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def rope_parameters(hf_config: Any) -> tuple[float, dict | None]:
    """(theta, scaling dict or None), reading transformers 5's `rope_parameters` or 4's fields."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = params if params.get("rope_type", "default") != "default" else None
        return float(params["rope_theta"]), scaling
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(getattr(hf_config, "rope_theta", 10000.0)), scaling


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling of the RoPE frequencies."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


SUPPORTED_SCALINGS = ("default", "linear", "llama3")


class RotaryEmbedding(CustomOp):
    def __init__(self, rotary_dim: int, max_position: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
            else:
                raise ValueError(f"rope scaling type {kind!r} is not supported ({', '.join(SUPPORTED_SCALINGS)})")
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        self.register_buffer("cos_sin_cache", cache.float(), persistent=False)

    def forward_native(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return RotaryInputs(positions, self.cos_sin_cache, cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype))

    def forward_cuda(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
        return RotaryInputs(positions, self.cos_sin_cache)

    def prepare(self, positions: torch.Tensor, dtype: torch.dtype) -> RotaryInputs:
        """This step's `RotaryInputs` for `positions` ([num_tokens]); `dtype`: the model's."""
        return self(positions, dtype)


def rotate_neox(q: torch.Tensor, k: torch.Tensor, rope: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference rotation: q [T, heads, head_dim], k [T, kv_heads, head_dim] -> rotated copies;
    dims past the table's rotary_dim pass through (partial rotary)."""
    cos, sin = rope.cos, rope.sin
    if cos is None:
        cos, sin = rope.cos_sin_cache.index_select(0, rope.positions).chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(1).to(q.dtype), sin.unsqueeze(1).to(q.dtype)
    rotary_dim = rope.cos_sin_cache.shape[1]
    return _rotate(q, cos, sin, rotary_dim), _rotate(k, cos, sin, rotary_dim)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot = x[..., :rotary_dim]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated if rotary_dim == x.shape[-1] else torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
