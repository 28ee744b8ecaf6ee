"""Tensor-parallel group state: rank, world size and the all-reduce the layers call.

With one rank (the only mode wired so far) every collective is a no-op, but layers already shard
their weights by `tp_rank()` / `tp_world_size()`, so the multi-process runner only has to
initialise torch.distributed and call `set_tensor_parallel(rank, size, group)`.
"""

from __future__ import annotations

import torch

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP = None


def set_tensor_parallel(rank: int, world_size: int, group=None) -> None:
    global _TP_RANK, _TP_SIZE, _TP_GROUP
    _TP_RANK, _TP_SIZE, _TP_GROUP = rank, world_size, group


def tp_rank() -> int:
    return _TP_RANK


def tp_world_size() -> int:
    return _TP_SIZE


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    torch.distributed.all_reduce(x, group=_TP_GROUP)
    return x


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    if _TP_SIZE == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP_SIZE)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_TP_GROUP)
    return torch.cat(parts, dim=-1)
