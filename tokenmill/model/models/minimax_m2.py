"""MiniMax-M2: grouped-query attention with an RMSNorm of q (and of k) over *all* heads at once
and partial rotary embedding (`rotary_dim` of each head), and a sparse MoE block
(`block_sparse_moe`) routed by sigmoid scores with an `e_score_correction_bias` that only chooses
the experts; the chosen experts' scores, renormalised, weigh them.

Under tensor parallelism each rank holds some heads, so the q/k norms sum their squares across
ranks (`layers/sharded_rms_norm.py`: one all-reduce of [T, 2] per layer). The checkpoint's
multi-token-prediction modules (`num_mtp_modules`, stored as layers past `num_hidden_layers`) are
not used for generation and are skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.attention.layer import Attention
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.moe.router import RoutingConfig
from tokenmill.model.layers.rotary_embedding import RotaryInputs
from tokenmill.model.layers.sharded_rms_norm import ShardedRMSNorm, sharded_rms_norm_pair
from tokenmill.model.models.llama import LlamaForCausalLM, head_dim_of
from tokenmill.model.models.mixtral import BlockSparseMoeDecoderLayer
from tokenmill.model.models.unsupported import refuse_unless


class MiniMaxM2Attention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        tp = build_context().tp
        head_dim = head_dim_of(config)
        num_kv_heads = config.num_key_value_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads, num_kv_heads)
        qkv = self.qkv_proj
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        input_slice=(qkv.q_start * head_dim, qkv.q_size))
        # Fewer KV heads than ranks: each is held by tp / num_kv_heads ranks.
        kv_replicas = max(1, tp.world_size // num_kv_heads)
        self.q_norm = ShardedRMSNorm(config.num_attention_heads * head_dim, (qkv.q_start * head_dim, qkv.q_size),
                                     config.rms_norm_eps)
        self.k_norm = ShardedRMSNorm(num_kv_heads * head_dim, (qkv.kv_start * head_dim, qkv.kv_size),
                                     config.rms_norm_eps, replicas=kv_replicas)
        self.attn = Attention(qkv.num_heads, qkv.num_kv_heads, head_dim, head_dim ** -0.5)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        return self._attend(self.qkv_proj(hidden), rope, kv_cache, meta)

    def forward_after_norm(self, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None,
                           rope: RotaryInputs, kv_cache: KVCache, meta: AttentionMetadata
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """As `LlamaAttention.forward_after_norm`."""
        qkv, residual = norm.forward_then(self.qkv_proj, hidden, residual)
        return self._attend(qkv, rope, kv_cache, meta), residual

    def _attend(self, qkv: torch.Tensor, rope: RotaryInputs, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(qkv)
        num_tokens = qkv.shape[0]
        q, k = sharded_rms_norm_pair(self.q_norm, q.reshape(num_tokens, -1), self.k_norm, k.reshape(num_tokens, -1))
        q, k = q.view(num_tokens, -1, v.shape[-1]), k.view(num_tokens, -1, v.shape[-1])
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, rope))


class MiniMaxM2SparseMoeBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        num_experts = config.num_local_experts
        self.gate = ReplicatedLinear(config.hidden_size, num_experts, bias=False)
        use_bias = bool(getattr(config, "use_routing_bias", True))
        if use_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.e_score_correction_bias = None
        routing = RoutingConfig(top_k=config.num_experts_per_tok, scoring="sigmoid", renormalize=True,
                                correction_bias=use_bias)
        self.experts = FusedMoE(num_experts, config.hidden_size, config.intermediate_size, routing,
                                hidden_act=config.hidden_act, router=self.gate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, correction_bias=self.e_score_correction_bias)

    def forward_after_norm(self, norm: nn.Module, hidden: torch.Tensor,
                           residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.experts.forward_after_norm(norm, hidden, residual, self.e_score_correction_bias)


class MiniMaxM2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any) -> None:
        refuse_unless(getattr(config, "scoring_func", "sigmoid") == "sigmoid", config, "scoring_func",
                      "MiniMax-M2 routes by sigmoid scores")
        refuse_unless(getattr(config, "use_qk_norm", True), config, "use_qk_norm",
                      "MiniMax-M2 always normalises q and k")
        refuse_unless(getattr(config, "qk_norm_type", "per_layer") == "per_layer", config, "qk_norm_type",
                      "only the norm over all heads at once")
        refuse_unless(not getattr(config, "shared_intermediate_size", 0), config, "shared_intermediate_size",
                      "shared experts")
        refuse_unless(getattr(config, "sliding_window", None) is None, config, "sliding_window",
                      "sliding-window attention")
        refuse_unless(all(getattr(config, "attn_type_list", None) or [1]), config, "attn_type_list",
                      "linear-attention layers (type 0)")
        super().__init__(config)

    def decoder_layer(self, config: Any, index: int) -> nn.Module:
        return BlockSparseMoeDecoderLayer(config, MiniMaxM2Attention(config), MiniMaxM2SparseMoeBlock(config))

    def skip_weight(self, name: str) -> bool:
        if super().skip_weight(name):
            return True
        # Multi-token-prediction modules: layers numbered from num_hidden_layers on.
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) >= self.config.num_hidden_layers
        return False
