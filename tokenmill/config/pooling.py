"""How an embedding model turns per-token hidden states into one vector: read from its
sentence-transformers files, next to where its encoder lives in the folder.

`modules.json` lists the modules (`Transformer`, `Pooling`, `Normalize`, ...), the Transformer's
`path` is the encoder's folder (config, weights, tokenizer), `<pooling dir>/config.json` sets the
mode and `sentence_bert_config.json` the sequence length the model was trained with. Without those
files the defaults are mean pooling, no normalisation, the encoder at the folder's root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum


class PoolingType(str, Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST = "last"


@dataclass(frozen=True)
class PoolingConfig:
    pooling_type: PoolingType
    normalize: bool
    # Matryoshka models: their embedding's prefixes are embeddings too (the `dimensions` parameter).
    matryoshka_dimensions: tuple[int, ...] | None = None
    supports_matryoshka: bool = False

    @classmethod
    def from_model_dir(cls, model_dir: str, encoder_config: dict | None = None,
                       default: PoolingType = PoolingType.MEAN) -> "PoolingConfig":
        modules = read_json(os.path.join(model_dir, "modules.json")) or []
        pooling_type, normalize = default, False
        for module in modules:
            kind = module.get("type", "").rsplit(".", 1)[-1]
            if kind == "Pooling":
                pooling_type = _pooling_type_from_st(
                    read_json(os.path.join(model_dir, module.get("path", ""), "config.json")) or {})
            elif kind == "Normalize":
                normalize = True
        encoder_config = encoder_config or {}
        dims = encoder_config.get("matryoshka_dimensions")
        return cls(pooling_type, normalize, tuple(dims) if dims else None,
                   bool(encoder_config.get("is_matryoshka") or dims))


def read_json(path: str) -> dict | list | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def encoder_dir(model_dir: str) -> str:
    """Where the encoder's own config, weights and tokenizer are (sentence-transformers may keep
    them in the Transformer module's subfolder)."""
    modules = read_json(os.path.join(model_dir, "modules.json")) or []
    sub = [m.get("path", "") for m in modules if m.get("type", "").endswith(".Transformer")]
    return os.path.join(model_dir, sub[0]) if sub else model_dir


def trained_max_len(model_dir: str) -> int | None:
    """sentence-transformers' `max_seq_length`: what the model was trained and evaluated with."""
    st_cfg = read_json(os.path.join(model_dir, "sentence_bert_config.json")) or {}
    return int(st_cfg["max_seq_length"]) if st_cfg.get("max_seq_length") else None


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
