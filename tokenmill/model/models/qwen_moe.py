"""Qwen2-MoE and Qwen3-MoE: Qwen2's / Qwen3's attention with a sparse mixture-of-experts `mlp`
(softmax router, `norm_topk_prob` renormalisation). Qwen2-MoE adds a shared expert whose output
is scaled by `sigmoid(shared_expert_gate(x))`; layers in `mlp_only_layers`, or off the
`decoder_sparse_step` stride, keep a dense MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tokenmill.model.layers.linear import ReplicatedLinear
from tokenmill.model.layers.mlp import GatedMLP
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.moe.router import RoutingConfig
from tokenmill.model.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from tokenmill.model.models.unsupported import refuse_unless


class QwenMoeSparseBlock(nn.Module):
    """Router `gate`, routed `experts`, and (Qwen2-MoE) the gated `shared_expert`."""

    def __init__(self, config: Any, shared_expert: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.gate = ReplicatedLinear(hidden, config.num_experts, bias=False)
        shared = gate = None
        if shared_expert:
            shared = self.shared_expert = GatedMLP(hidden, config.shared_expert_intermediate_size,
                                                   hidden_act=config.hidden_act, reduce_results=False)
            gate = self.shared_expert_gate = ReplicatedLinear(hidden, 1, bias=False)
        routing = RoutingConfig(top_k=config.num_experts_per_tok, renormalize=bool(config.norm_topk_prob))
        self.experts = FusedMoE(config.num_experts, hidden, config.moe_intermediate_size, routing,
                                shared_experts=shared, shared_expert_gate=gate, hidden_act=config.hidden_act,
                                router=self.gate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden)

    def forward_after_norm(self, norm: nn.Module, hidden: torch.Tensor,
                           residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.experts.forward_after_norm(norm, hidden, residual)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    qk_norm = True

    def __init__(self, config: Any) -> None:
        refuse_unless(not getattr(config, "use_sliding_window", False), config, "use_sliding_window",
                      "sliding-window attention")
        refuse_unless(not (self.qk_norm and getattr(config, "attention_bias", False)), config, "attention_bias",
                      "Qwen3-MoE's output-projection bias")
        super().__init__(config)

    def qkv_bias(self, config: Any) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def has_shared_expert(self, config: Any) -> bool:
        return False

    def decoder_layer(self, config: Any, index: int) -> nn.Module:
        step = getattr(config, "decoder_sparse_step", 1) or 1
        sparse = (index not in (getattr(config, "mlp_only_layers", None) or [])
                  and config.num_experts > 0 and (index + 1) % step == 0)
        if sparse:
            mlp = QwenMoeSparseBlock(config, self.has_shared_expert(config))
        else:
            mlp = GatedMLP(config.hidden_size, config.intermediate_size, hidden_act=config.hidden_act)
        return LlamaDecoderLayer(config, self.qkv_bias(config), self.qk_norm, mlp=mlp)


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False

    def qkv_bias(self, config: Any) -> bool:
        return bool(getattr(config, "qkv_bias", True))

    def has_shared_expert(self, config: Any) -> bool:
        return bool(getattr(config, "shared_expert_intermediate_size", 0))
