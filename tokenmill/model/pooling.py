"""Pooling: packed per-token hidden states -> one vector per sequence.

Which pooling a model wants is read from its sentence-transformers files: `modules.json` lists the
modules (`Transformer`, `Pooling`, `Normalize`, ...) and `<pooling dir>/config.json` sets the mode.
Without those files the caller picks a default: mean for encoders, last-token for decoder embedders
(a causal model's last token is the only one that has seen the whole text).

All poolers take packed hidden states `[num_tokens, hidden]` and `cu_seqlens` `[num_seqs + 1]`
(sequence i owns rows `cu_seqlens[i]:cu_seqlens[i+1]`), the layout every tokenmill model emits.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F


class PoolingType(str, Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@dataclass(frozen=True)
class PoolingConfig:
    pooling_type: PoolingType
    normalize: bool

    @classmethod
    def from_model_dir(cls, model_dir: str, default: PoolingType = PoolingType.MEAN) -> "PoolingConfig":
        """Read sentence-transformers' `modules.json` (+ its Pooling config); fall back to
        `default` pooling without normalization when the folder has no `modules.json`."""
        modules_path = os.path.join(model_dir, "modules.json")
        if not os.path.exists(modules_path):
            return cls(default, normalize=False)
        with open(modules_path) as f:
            modules = json.load(f)
        pooling_type, normalize = default, False
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Pooling":
                with open(os.path.join(model_dir, module.get("path", ""), "config.json")) as f:
                    pooling_type = _pooling_type_from_st(json.load(f))
            elif kind == "Normalize":
                normalize = True
        return cls(pooling_type, normalize)


def _pooling_type_from_st(cfg: dict) -> PoolingType:
    # Newer sentence-transformers write "pooling_mode": "mean"; older ones one boolean per mode.
    mode = cfg.get("pooling_mode")
    if mode is None:
        on = [k for k in ("cls_token", "mean_tokens", "lasttoken", "max_tokens", "mean_sqrt_len_tokens",
                          "weightedmean_tokens") if cfg.get(f"pooling_mode_{k}")]
        if len(on) != 1:
            raise ValueError(f"exactly one pooling mode must be set in the Pooling config, got {on}")
        mode = on[0]
    table = {"mean": PoolingType.MEAN, "mean_tokens": PoolingType.MEAN, "cls": PoolingType.CLS,
             "cls_token": PoolingType.CLS, "lasttoken": PoolingType.LAST, "last": PoolingType.LAST}
    if mode not in table:
        raise ValueError(f"pooling mode {mode!r} is not supported; supported: mean, cls, lasttoken")
    return table[mode]


def mean_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[num_tokens, hidden] -> [num_seqs, hidden]: average of each sequence's tokens (in float32,
    so bf16 models do not lose precision summing a few hundred tokens)."""
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
    """Pool and (if the model says so) L2-normalize: [num_tokens, hidden] -> [num_seqs, hidden] float32."""
    out = _POOLERS[cfg.pooling_type](hidden, cu_seqlens)
    return F.normalize(out, p=2, dim=-1) if cfg.normalize else out


def truncate_and_normalize(emb: torch.Tensor | list[float], dims: int) -> torch.Tensor | list[float]:
    """Matryoshka truncation: keep the first `dims` components and L2-normalize again.

    Takes one embedding (a list or a 1-D tensor) or a `[num_seqs, hidden]` tensor; returns the
    same kind. Only meaningful for models trained for it (`supports_matryoshka`)."""
    if dims < 1:
        raise ValueError(f"dims must be >= 1, got {dims}")
    as_list = isinstance(emb, list)
    t = torch.as_tensor(emb, dtype=torch.float32) if as_list else emb
    if dims > t.shape[-1]:
        raise ValueError(f"dims {dims} exceeds the embedding size {t.shape[-1]}")
    out = F.normalize(t[..., :dims].float(), p=2, dim=-1)
    return out.tolist() if as_list else out
