"""BERT encoders (HF `BertModel`, and the encoder inside `BertForMaskedLM` / `BertForPreTraining`
checkpoints), for embedding models such as all-MiniLM-L6-v2.

Tokens of a step's sequences are packed `[num_tokens, hidden]`; every linear layer, norm and
activation runs on exactly the real tokens, and attention is bidirectional within each sequence
(`model/attention/encoder.py`). The output is the last hidden states; pooling them into one vector
per sequence is the runner's (`model/layers/pooler.py`). Post-LN blocks:
`x = LN(x + Attn(x)); x = LN(x + FFN(x))`. HF weight names are kept (Q, K and V are merged into one
matrix at load, so a layer does one GEMM for them instead of three).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.layer import Attention
from tokenmill.model.layers.linear import QKVParallelLinear, ReplicatedLinear


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        # Single-segment texts: token type 0 everywhere.
        return self.LayerNorm(x + self.token_type_embeddings.weight[0])


class BertSelfAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        self.qkv = QKVParallelLinear(config.hidden_size, head_dim, heads, heads, bias=True)
        self.attn = Attention(heads, heads, head_dim, head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv.split_qkv(self.qkv(x))
        return self.attn(q, k, v, None, meta)


class BertOutput(nn.Module):
    """A projection, then the residual add and LayerNorm (HF's `BertSelfOutput` / `BertOutput`)."""

    def __init__(self, in_features: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.dense = ReplicatedLinear(in_features, hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.output(self.self(x, meta), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        # The activation runs inside the GEMM where the kernel can (oneDNN on the CPU).
        self.dense = ReplicatedLinear(config.hidden_size, config.intermediate_size, bias=True,
                                      activation=config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class BertLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.attention(x, meta)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """The encoder: packed token ids in, packed last hidden states out."""

    is_encoder = True
    stacked_params = (
        ("qkv", "query", "q"),
        ("qkv", "key", "k"),
        ("qkv", "value", "v"),
    )
    # Heads of `BertFor*` checkpoints and buffers HF saves; none is part of the encoder.
    ignored_weights = ("pooler.", "cls.", "position_ids")
    hf_name_prefix = "bert."  # `BertFor*` checkpoints keep the encoder under it

    def __init__(self, config: Any) -> None:
        super().__init__()
        position_type = getattr(config, "position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type {position_type!r} is not supported (absolute)")
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list,
                meta: AttentionMetadata) -> torch.Tensor:
        """input_ids / positions [num_tokens] (positions restart at 0 for each sequence) ->
        [num_tokens, hidden]. `kv_caches`: unused (an encoder keeps none)."""
        x = self.embeddings(input_ids, positions)
        for layer in self.encoder.layer:
            x = layer(x, meta)
        return x
