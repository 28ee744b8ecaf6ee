"""MiniMax-Text-01 / MiniMax-M1 (HF `MiniMaxForCausalLM`): lightning (linear) attention in most
layers and softmax attention every few (`layer_types`), each followed by a sparse MoE block.

A lightning layer (`self_attn`, HF's `MiniMaxLightningAttention`):
    q, k, v = split(silu(qkv_proj(x)))   (per head, q | k | v adjacent in qkv_proj's rows)
    o = lightning(q, k, v)               (per-head decay rates; a state slot per request)
    out_proj(sigmoid(output_gate(x)) * norm(o))   (norm: one RMSNorm over all heads)
A softmax layer: grouped-query attention with partial rotary embedding (the checkpoint's
`rotary_dim`, or `partial_rotary_factor`, of each head) and, with `sliding_window`, a window.

Residuals follow HF's MiniMax: the residual of each block is its *normed* input, scaled by alpha,
and the block's output is scaled by beta (`linear_attn_*` / `full_attn_*` / `mlp_*_factor`):
    n1 = input_layernorm(h);  n2 = post_attention_layernorm(alpha_attn * n1 + beta_attn * attn(n1))
    h' = alpha_mlp * n2 + beta_mlp * moe(n2)
Here beta scales the output projection's input (attention) or the routing weights (MoE), so each
block's output still goes straight into the next RMSNorm (which adds the alpha-scaled residual), as
the tensor-parallel sum deferred to that norm requires.

HF's MiniMax rotates the whole head and ignores a `rotary_dim`; the released checkpoints set
`rotary_dim: 64` of `head_dim: 128`, which their own code (and this file) honours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config.attention_layout import LINEAR, attention_layout
from tokenmill.config.parallel import divide
from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.layer import Attention
from tokenmill.model.attention.lightning import LightningAttention
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.linear import ColumnParallelLinear, QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.moe.router import RoutingConfig
from tokenmill.model.layers.rotary_embedding import RotaryEmbedding, RotaryInputs, rope_parameters
from tokenmill.model.layers.sharded_rms_norm import ShardedRMSNorm
from tokenmill.model.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding
from tokenmill.model.models.llama import head_dim_of


def rotary_dim(config: Any) -> int:
    """Rotated dims per head: the checkpoints' `rotary_dim`, else `partial_rotary_factor` of the head."""
    if getattr(config, "rotary_dim", None):
        return config.rotary_dim
    params = getattr(config, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    factor = factor or getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim_of(config) * factor)


def lightning_slopes(num_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates [num_heads] float32, as HF computes them: base^(h+1) with base =
    2^(-8 / num_heads), times a factor falling from 1 at the first layer to ~0 at the last."""
    base = 1 / (2 ** (8 / num_heads))
    rate = base ** (torch.arange(num_heads) + 1)
    return rate * (1 - layer / (num_layers - 1 + 1e-5) + 1e-5)


class MiniMaxLightningAttention(nn.Module):
    def __init__(self, config: Any, layer: int) -> None:
        super().__init__()
        tp = build_context().tp
        head_dim = head_dim_of(config)
        num_heads = config.num_attention_heads
        local = divide(num_heads, tp.world_size, "linear-attention heads")
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = local, head_dim
        # Rows of qkv_proj are grouped by head (q | k | v of head 0, then head 1, ...), so a
        # contiguous split gives each rank whole heads; output_gate's and norm's follow the heads.
        self.qkv_proj = ColumnParallelLinear(config.hidden_size, 3 * inner)
        self.output_gate = ColumnParallelLinear(config.hidden_size, inner)
        self.out_proj = RowParallelLinear(inner, config.hidden_size)
        self.norm = ShardedRMSNorm(inner, (tp.rank * local * head_dim, local * head_dim), eps=1e-6)
        slopes = lightning_slopes(num_heads, layer, config.num_hidden_layers)[tp.rank * local:(tp.rank + 1) * local]
        self.attn = LightningAttention(local, head_dim, slopes)
        self.beta = float(config.linear_attn_beta_factor)

    def forward(self, hidden: torch.Tensor, state_pool: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        qkv = F.silu(self.qkv_proj(hidden)).view(hidden.shape[0], self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        out = torch.sigmoid(self.output_gate(hidden)) * self.norm(self.attn(q, k, v, state_pool, meta))
        return self.out_proj(out * self.beta if self.beta != 1.0 else out)


class MiniMaxAttention(nn.Module):
    def __init__(self, config: Any, sliding_window: int | None) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          config.num_key_value_heads)
        qkv = self.qkv_proj
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        input_slice=(qkv.q_start * head_dim, qkv.q_size))
        self.attn = Attention(qkv.num_heads, qkv.num_kv_heads, head_dim, head_dim ** -0.5, sliding_window)
        self.beta = float(config.full_attn_beta_factor)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(self.qkv_proj(hidden))
        out = self.attn(q, k, v, kv_cache, meta, rope)
        return self.o_proj(out * self.beta if self.beta != 1.0 else out)


class MiniMaxSparseMoeBlock(nn.Module):
    """Softmax router over `num_local_experts`, top `num_experts_per_tok` renormalised; the
    routing weights carry the block's beta (`mlp_beta_factor`)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = config.num_local_experts
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        routing = RoutingConfig(top_k=config.num_experts_per_tok, renormalize=True,
                                routed_scaling_factor=float(config.mlp_beta_factor))
        self.experts = FusedMoE(num_experts, config.hidden_size, config.intermediate_size, routing,
                                hidden_act=config.hidden_act, router=self.gate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden)


class MiniMaxDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer: int) -> None:
        super().__init__()
        layout = attention_layout(config, config.architectures[0])
        self.is_linear = layout.layer_kinds[layer] == LINEAR
        if self.is_linear:
            self.self_attn = MiniMaxLightningAttention(config, layer)
            self.attn_alpha = float(config.linear_attn_alpha_factor)
        else:
            self.self_attn = MiniMaxAttention(config, layout.window(layer))
            self.attn_alpha = float(config.full_attn_alpha_factor)
        self.mlp_alpha = float(config.mlp_alpha_factor)
        self.block_sparse_moe = MiniMaxSparseMoeBlock(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs, cache,
                meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden`: the previous block's output (beta already applied), `residual`: its
        alpha-scaled residual (None on the first layer). Returns the same pair for the next."""
        if residual is None:
            normed = self.input_layernorm(hidden)
        else:
            normed, _ = self.input_layernorm(hidden, residual)
        if self.is_linear:
            out = self.self_attn(normed, cache, meta)
        else:
            out = self.self_attn(normed, rope, cache, meta)
        normed, _ = self.post_attention_layernorm(out, _scaled(normed, self.attn_alpha))
        return self.block_sparse_moe(normed), _scaled(normed, self.mlp_alpha)


def _scaled(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return x * alpha if alpha != 1.0 else x


class MiniMaxModel(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MiniMaxDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        theta, scaling = rope_parameters(config)
        self.rotary_emb = RotaryEmbedding(rotary_dim(config), config.max_position_embeddings, theta, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list, meta: AttentionMetadata
                ) -> torch.Tensor:
        """`caches`: per layer, its KV cache (softmax) or its state pool (lightning)."""
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.prepare(positions, hidden.dtype)
        residual = None
        for layer, cache in zip(self.layers, caches):
            hidden, residual = layer(hidden, residual, rope, cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class MiniMaxForCausalLM(nn.Module):
    # HF name fragment -> (merged parameter fragment, shard id); the softmax layers' q/k/v.
    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
    )
    # Recomputed from the config, not loaded: HF saves its decay tables as buffers.
    ignored_weights = ("rotary_emb.inv_freq", "self_attn.slope_rate", "self_attn.query_decay",
                       "self_attn.key_decay", "self_attn.diagonal_decay")

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = MiniMaxModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, caches: list,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits."""
        return self.lm_head.compute_logits(hidden)

    def skip_weight(self, name: str) -> bool:
        return name == "lm_head.weight" and self.tie_word_embeddings
