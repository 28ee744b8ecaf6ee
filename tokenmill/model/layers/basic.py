"""Small layers of the decoder: RMSNorm (with fused residual add), SiLU-and-mul, rotary embedding,
and the vocab-parallel embedding / LM head."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.distributed.parallel_state import (
    tp_all_gather_last_dim,
    tp_all_reduce,
    tp_all_reduce_add_rms_norm,
    tp_rank,
    tp_world_size,
)


def _fused_ops():
    """The Triton fused kernels, imported on first CUDA use (CPU installs never import Triton)."""
    from tokenmill.model.layers import triton_ops
    return triton_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """RMSNorm(x) or, with a residual, (RMSNorm(x + residual), x + residual).

        Computed in float32 like HF, so low-precision runs match the reference closely. On CUDA
        one fused Triton kernel does the add and the norm in a single pass.
        """
        if x.is_cuda:
            return _fused_ops().rms_norm(x, self.weight, self.eps, residual)
        orig_dtype = x.dtype
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(orig_dtype)
        return out if residual is None else (out, residual)

    def reduce_add(self, partial: torch.Tensor, residual: torch.Tensor | None, slot: int):
        """`self(sum over ranks of partial, residual)`: a row-parallel layer's unreduced output
        summed, added to the residual and normalised; (normed, new residual). Without a residual
        (the first layer's input, the embeddings' sum): (normed sum, sum). Under tensor
        parallelism on GPUs the steps are one kernel (`distributed/all_reduce_rms_norm.py`);
        `slot` (0 or 1) must alternate between consecutive calls (the embeddings use slot 2)."""
        fused = tp_all_reduce_add_rms_norm(partial, residual, self.weight, self.eps, slot)
        if fused is not None:
            return fused
        summed = tp_all_reduce(partial)
        return self(summed, residual) if residual is not None else (self(summed), summed)


class SiluAndMul(nn.Module):
    """[..., 2 * d] -> silu(first half) * second half."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return _fused_ops().silu_and_mul(x)
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]


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


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (HF's rotate_half) with a precomputed [max_pos, rot_dim] cos|sin cache."""

    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        # float32 throughout, computed exactly as HF does, so greedy tokens match it bit for bit.
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        attention_factor = 1.0
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, scaling)
            elif kind == "linear":
                inv_freq = inv_freq / scaling["factor"]
            else:
                raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)
        cache = torch.cat([freqs.cos() * attention_factor, freqs.sin() * attention_factor], dim=-1)
        self.register_buffer("cos_sin_cache", cache.float(), persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token (cos, sin), each [T, 1, rot_dim / 2]; looked up once per step, used by every layer.

        On CUDA the fused kernel reads the table itself: returns (positions, table) for `apply_rotary`.
        """
        if positions.is_cuda:
            return positions, self.cos_sin_cache
        cos, sin = self.cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q: [T, heads, head_dim], k: [T, kv_heads, head_dim] -> rotated q, k.

    On CUDA (`cos`, `sin` are then the positions and the cos|sin table) q and k are rotated in
    place by one fused kernel.
    """
    if q.is_cuda:
        _fused_ops().rope_neox_(q, k, cos, sin)
        return q, k
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class VocabParallelEmbedding(nn.Module):
    """Embedding table with rows split across ranks; out-of-shard ids contribute zeros."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        tp = tp_world_size()
        self.vocab_size = vocab_size
        self.rows_per_rank = (vocab_size + tp - 1) // tp
        self.start = tp_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = min(self.rows_per_rank, loaded.shape[0] - self.start)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.start:self.start + rows])

    def forward(self, input_ids: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The embeddings of `input_ids`; with `reduce=False` under tensor parallelism this rank's
        share only (zeros for ids outside its rows), for a caller that sums it later (the first
        layer's norm, in the same kernel)."""
        if tp_world_size() == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        in_shard = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight)
        out = out * in_shard.unsqueeze(-1).to(out.dtype)
        return tp_all_reduce(out) if reduce else out


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocab split across ranks; logits gathered to full width."""

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = F.linear(hidden, self.weight)
        logits = tp_all_gather_last_dim(logits)
        return logits[..., : self.vocab_size]
