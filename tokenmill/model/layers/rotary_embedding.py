"""Rotary position embedding (RoPE) with the scalings HF configs name: default, linear, llama3,
yarn.

One `RotaryEmbedding` per model holds the `[max_position, rotary_dim]` cos|sin table (float32,
computed as HF computes it, so greedy tokens match bit for bit; YaRN's attention factor is folded
into it, as HF multiplies cos and sin by it). Each step the model calls `prepare(positions)` once;
every attention layer then rotates its q and k with that `RotaryInputs`, either through
`rotate_neox` / `rotate_interleaved` (the references) or fused into its KV-cache write (the Triton
backends read `positions` and the table themselves).

Two layouts of the rotated dims: neox (HF's `rotate_half`: dim i pairs with dim i + rotary_dim/2),
and interleaved (DeepSeek's: dims 2i and 2i+1 form a pair). Both use the table's frequency i for
pair i. HF's DeepSeek-V3 code writes the interleaved result de-interleaved (evens, then odds);
`rotate_interleaved` keeps each pair in place instead. q and k are permuted alike either way, so
every q.k product, which is all attention reads, is the same.
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


def yarn_get_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(rotary_dim: int, theta: float, max_position: int, scaling: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [rotary_dim / 2], attention factor) of YaRN, as HF's `_compute_yarn_parameters`:
    frequencies above `beta_fast` rotations over the original context are kept (extrapolated),
    those below `beta_slow` are divided by `factor` (interpolated), with a linear ramp between."""
    factor = scaling.get("factor")
    original = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = max_position / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (rotary_dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rotary_dim - 1)
    if low == high:
        high += 0.001  # (HF's guard against a zero-width ramp)
    ramp = ((torch.arange(rotary_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, rotary_dim, 2).to(dtype=torch.float) / rotary_dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, attention_factor


def softmax_mscale(scaling: dict | None) -> float:
    """The factor DeepSeek's attention multiplies its softmax scale by under YaRN:
    `yarn_get_mscale(factor, mscale_all_dim) ** 2` (HF's `yarn_apply_mscale`; 1 without it)."""
    if scaling is None or not scaling.get("mscale_all_dim"):
        return 1.0
    return yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2


SUPPORTED_SCALINGS = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding(CustomOp):
    def __init__(self, rotary_dim: int, max_position: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
        attention_factor = 1.0
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
            elif kind == "yarn":
                inv_freq, attention_factor = _yarn_inv_freq(rotary_dim, theta, max_position, scaling)
            else:
                raise ValueError(f"rope scaling type {kind!r} is not supported ({', '.join(SUPPORTED_SCALINGS)})")
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
        if attention_factor != 1.0:
            cache = cache * attention_factor
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
    cos, sin = _cos_sin(rope, q.dtype)
    rotary_dim = rope.cos_sin_cache.shape[1]
    return _rotate(q, cos, sin, rotary_dim), _rotate(k, cos, sin, rotary_dim)


def rotate_interleaved(q: torch.Tensor, k: torch.Tensor, rope: RotaryInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference rotation of the interleaved layout: dims (2i, 2i+1) rotate by frequency i, and
    stay where they are. q [T, heads, rotary_dim], k [T, kv_heads, rotary_dim] -> rotated copies."""
    cos, sin = _cos_sin(rope, q.dtype)
    return _rotate_pairs(q, cos, sin), _rotate_pairs(k, cos, sin)


def _cos_sin(rope: RotaryInputs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if rope.cos is not None:
        return rope.cos, rope.sin
    cos, sin = rope.cos_sin_cache.index_select(0, rope.positions).chunk(2, dim=-1)
    return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot = x[..., :rotary_dim]
    x1, x2 = rot.chunk(2, dim=-1)
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return rotated if rotary_dim == x.shape[-1] else torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
