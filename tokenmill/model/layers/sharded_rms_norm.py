"""RMSNorm over a dimension split across tensor-parallel ranks (MiniMax's q/k norm over all heads
at once, `models/minimax_m2.py`; MiniMax-M1's norm of the linear-attention output).

Each rank holds a slice of the normalised vector (its heads) and of the norm's weight; the mean of
squares needs every rank's slice, so each rank sums the squares of its own, the ranks add those
sums (one all-reduce of [T] float32 per norm, or of [T, 2] for a pair), and each normalises its
slice by the total. Where a slice is replicated on several ranks (KV heads fewer than ranks), its
squares are counted once per copy, so the total is divided by the copy count. Computed in float32
and rounded as HF's RMSNorm (`weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)`).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.model.build_context import build_context


class ShardedRMSNorm(nn.Module):
    """Args:
        full_size: the whole normalised dimension (e.g. heads * head_dim).
        shard: (start, size) of this rank's slice of it.
        replicas: how many ranks hold each slice (1: every slice on one rank).
    """

    def __init__(self, full_size: int, shard: tuple[int, int], eps: float = 1e-6, replicas: int = 1) -> None:
        super().__init__()
        self.tp = build_context().tp
        self.full_size = full_size
        self.start, self.size = shard
        self.replicas = replicas
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape != (self.full_size,):
            raise ValueError(f"norm weight shape {tuple(loaded.shape)}, expected ({self.full_size},)")
        param.data.copy_(loaded[self.start:self.start + self.size])

    def local_sum_squares(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, size] -> [T] float32: this rank's part of the sum of squares."""
        return x.float().pow(2).sum(dim=-1)

    def normalize(self, x: torch.Tensor, total_sum_squares: torch.Tensor) -> torch.Tensor:
        """x [T, size] and the sum over ranks of `local_sum_squares` [T] -> the normalised slice."""
        variance = total_sum_squares / (self.replicas * self.full_size)
        h = x.float() * torch.rsqrt(variance + self.eps).unsqueeze(-1)
        return self.weight * h.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x, self.tp.all_reduce(self.local_sum_squares(x)))


def sharded_rms_norm_pair(norm_a: ShardedRMSNorm, a: torch.Tensor, norm_b: ShardedRMSNorm, b: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(norm_a(a), norm_b(b))` with one all-reduce for both sums of squares (q and k)."""
    sums = torch.stack([norm_a.local_sum_squares(a), norm_b.local_sum_squares(b)], dim=-1)  # [T, 2]
    sums = norm_a.tp.all_reduce(sums)
    return norm_a.normalize(a, sums[:, 0]), norm_b.normalize(b, sums[:, 1])
