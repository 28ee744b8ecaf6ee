"""Pooling: packed per-token hidden states -> one vector per sequence, as an embedding model's
output (`config/pooling.py` reads which pooling a model wants).

Hidden states are packed `[num_tokens, hidden]` with `cu_seqlens` `[num_seqs + 1]` (sequence i owns
rows `cu_seqlens[i]:cu_seqlens[i+1]`), the layout every tokenmill model emits. Results are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.config.pooling import PoolingConfig, PoolingType


def mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Average of each sequence's tokens (in float32, so bf16 models do not lose precision summing
    a few hundred tokens)."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    # output_size spares a device sync on CUDA (the result's length is known: num_tokens).
    seq_ids = torch.repeat_interleave(torch.arange(len(lens), device=hidden.device), lens,
                                      output_size=hidden.shape[0])
    sums = torch.zeros(len(lens), hidden.shape[1], dtype=torch.float32, device=hidden.device)
    sums.index_add_(0, seq_ids, hidden.float())
    return sums / lens[:, None].to(torch.float32)


def cls_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each sequence's first token ([CLS] for BERT-style tokenizers)."""
    return hidden.index_select(0, cu_seqlens[:-1]).float()


def last_token_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Each sequence's last token: the pooling of decoder (causal) embedders."""
    return hidden.index_select(0, cu_seqlens[1:] - 1).float()


_POOLERS = {PoolingType.MEAN: mean_pool, PoolingType.CLS: cls_pool, PoolingType.LAST: last_token_pool}


def pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, cfg: PoolingConfig) -> torch.Tensor:
    """Pool and (if the model says so) L2-normalise: [num_tokens, hidden] -> [num_seqs, hidden] float32."""
    out = _POOLERS[cfg.pooling_type](hidden, cu_seqlens)
    return F.normalize(out, p=2, dim=-1) if cfg.normalize else out


def truncate_and_normalize(emb: torch.Tensor | list[float], dims: int) -> torch.Tensor | list[float]:
    """Matryoshka truncation: keep the first `dims` components and L2-normalise again.

    Takes one embedding (a list or a 1-D tensor) or a `[num_seqs, hidden]` tensor; returns the
    same kind. Only meaningful for models trained for it (`PoolingConfig.supports_matryoshka`)."""
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    as_list = isinstance(emb, list)
    t = torch.as_tensor(emb, dtype=torch.float32) if as_list else emb
    if dims > t.shape[-1]:
        raise ValueError(f"dims {dims} exceeds the embedding size {t.shape[-1]}")
    out = F.normalize(t[..., :dims].float(), p=2, dim=-1)
    return out.tolist() if as_list else out
