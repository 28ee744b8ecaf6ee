"""Mixtral: Mistral's attention with a sparse mixture-of-experts block (`block_sparse_moe`: a
softmax router choosing `num_experts_per_tok` of `num_local_experts` experts, weights
renormalised) in place of the MLP. The decoder layer here also serves MiniMax-M2."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.linear import ReplicatedLinear
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.moe.router import RoutingConfig
from tokenmill.model.layers.rotary_embedding import RotaryInputs
from tokenmill.model.models.llama import LlamaAttention, LlamaForCausalLM
from tokenmill.model.models.unsupported import refuse_unless


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.gate = ReplicatedLinear(config.hidden_size, config.num_local_experts, bias=False)
        self.experts = FusedMoE(config.num_local_experts, config.hidden_size, config.intermediate_size,
                                RoutingConfig(top_k=config.num_experts_per_tok, renormalize=True),
                                hidden_act=config.hidden_act, router=self.gate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden)

    def forward_after_norm(self, norm: nn.Module, hidden: torch.Tensor,
                           residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.experts.forward_after_norm(norm, hidden, residual)


class BlockSparseMoeDecoderLayer(nn.Module):
    """Pre-norm attention, then the MoE block, under the checkpoints' name `block_sparse_moe`;
    each half a `forward_after_norm` as in `LlamaDecoderLayer`."""

    def __init__(self, config: Any, self_attn: nn.Module, block_sparse_moe: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.block_sparse_moe = block_sparse_moe
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs,
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.self_attn.forward_after_norm(self.input_layernorm, hidden, residual, rope,
                                                             kv_cache, meta)
        return self.block_sparse_moe.forward_after_norm(self.post_attention_layernorm, hidden, residual)


class MixtralForCausalLM(LlamaForCausalLM):
    def __init__(self, config: Any) -> None:
        refuse_unless(getattr(config, "sliding_window", None) is None, config, "sliding_window",
                      "sliding-window attention")
        super().__init__(config)

    def decoder_layer(self, config: Any, index: int) -> nn.Module:
        return BlockSparseMoeDecoderLayer(config, LlamaAttention(config, qkv_bias=False, qk_norm=False),
                                          MixtralSparseMoeBlock(config))
