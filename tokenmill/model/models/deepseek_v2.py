"""DeepSeek-V2 and DeepSeek-V3 (and the models built on V3's code: Kimi-K2, Moonlight): decoders
with multi-head latent attention (`model/attention/mla.py`) and, after `first_k_dense_replace`
dense layers, mixture-of-experts MLPs.

HF weight names are kept: `self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}`,
`kv_a_proj_with_mqa` (latent and rope key in one matrix), `kv_a_layernorm`, `kv_b_proj`, `o_proj`.
Under tensor parallelism the heads split (`q_proj` / `q_b_proj`, `kv_b_proj` by output rows,
`o_proj` by input columns); the down-projections to the latent ranks are replicated, and so is
the latent cache.

V2 rotates its rope dims as interleaved pairs; V3 does when `rope_interleave` (the default, and
what DeepSeek-V3 and Kimi-K2 checkpoints mean). YaRN scaling multiplies the softmax scale by
`mscale_all_dim`'s factor squared, as HF's DeepSeek attention does.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config.parallel import divide
from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.mla import MLAAttention
from tokenmill.model.attention.mla_backend import MLADims
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from tokenmill.model.layers.mlp import GatedMLP
from tokenmill.model.layers.moe.fused_moe import FusedMoE
from tokenmill.model.layers.moe.router import RoutingConfig
from tokenmill.model.layers.rotary_embedding import RotaryEmbedding, RotaryInputs, rope_parameters, softmax_mscale
from tokenmill.model.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def check_supported(config: Any) -> None:
    """Refuse, naming the field, a config whose math this implementation does not do (the routing
    fields are checked by each family's `routing`)."""
    if not getattr(config, "kv_lora_rank", None):
        raise ValueError("kv_lora_rank is not set: DeepSeek models without latent attention are not supported")
    if _num_dense_layers(config) < config.num_hidden_layers and getattr(config, "moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq={config.moe_layer_freq} is not supported (every layer after "
                         "first_k_dense_replace is a mixture of experts)")


def _num_dense_layers(config: Any) -> int:
    return min(config.first_k_dense_replace or 0, config.num_hidden_layers)


class DeepseekGate(nn.Module):
    """The router: logits [T, num_experts] in float32 from a float32 weight and a float32 copy of
    the hidden state (HF keeps both `mlp.gate.weight` and DeepSeek-V3's
    `mlp.gate.e_score_correction_bias` in float32, so routing ties break as HF's do)."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        self.e_score_correction_bias = (nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                     requires_grad=False) if correction_bias else None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight)


class DeepseekV2MoE(nn.Module):
    """Routed experts (`FusedMoE` at HF's `mlp.experts`) plus the shared experts, summed over
    tensor-parallel ranks once, by the next RMSNorm."""

    def __init__(self, config: Any, routing: RoutingConfig) -> None:
        super().__init__()
        num_experts, hidden = config.n_routed_experts, config.hidden_size
        self.gate = DeepseekGate(hidden, num_experts, routing.correction_bias)
        self.shared_experts = None
        if config.n_shared_experts:
            self.shared_experts = GatedMLP(hidden, config.moe_intermediate_size * config.n_shared_experts,
                                           hidden_act=config.hidden_act, reduce_results=False)
        self.experts = FusedMoE(num_experts, hidden, config.moe_intermediate_size, routing,
                                shared_experts=self.shared_experts, hidden_act=config.hidden_act, router=self.gate)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.experts(hidden, correction_bias=self.gate.e_score_correction_bias)

    def forward_after_norm(self, norm: nn.Module, hidden: torch.Tensor,
                           residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.experts.forward_after_norm(norm, hidden, residual,
                                               correction_bias=self.gate.e_score_correction_bias)


class DeepseekV2Attention(nn.Module):
    def __init__(self, config: Any, interleaved_rope: bool) -> None:
        super().__init__()
        tp = build_context().tp
        hidden, heads = config.hidden_size, config.num_attention_heads
        bias = bool(getattr(config, "attention_bias", False))
        self.num_heads = divide(heads, tp.world_size, "attention heads")
        self.dims = MLADims(self.num_heads, config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                            config.v_head_dim)
        qk_head_dim = self.dims.qk_head_dim
        self.q_lora_rank = config.q_lora_rank
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_head_dim)
        else:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_head_dim)
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, config.rms_norm_eps)
        self.kv_b_proj = ColumnParallelLinear(config.kv_lora_rank, heads * (config.qk_nope_head_dim + config.v_head_dim))
        self.o_proj = RowParallelLinear(heads * config.v_head_dim, hidden, bias=bias)
        _, scaling = rope_parameters(config)
        scale = qk_head_dim ** -0.5 * softmax_mscale(scaling)
        self.mla_attn = MLAAttention(self.dims, scale, self.kv_b_proj, interleaved_rope)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.q_lora_rank is None:
            q = self.q_proj(hidden)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        latent, k_pe = self.kv_a_proj_with_mqa(hidden).split([self.dims.kv_lora_rank, self.dims.qk_rope_head_dim], -1)
        out = self.mla_attn(q.view(-1, self.num_heads, self.dims.qk_head_dim), self.kv_a_layernorm(latent), k_pe,
                            kv_cache, meta, rope)
        return self.o_proj(out)


class DeepseekV2DecoderLayer(nn.Module):
    def __init__(self, config: Any, interleaved_rope: bool, mlp_bias: bool, routing: RoutingConfig | None) -> None:
        """`routing`: this layer's experts' (None: a dense MLP)."""
        super().__init__()
        self.self_attn = DeepseekV2Attention(config, interleaved_rope)
        if routing is None:
            self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, bias=mlp_bias,
                                hidden_act=getattr(config, "hidden_act", "silu"))
        else:
            self.mlp = DeepseekV2MoE(config, routing)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block; `residual` is None on the first layer. Returns (hidden, residual)."""
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, kv_cache, meta)
        # The post-attention norm may run inside the dense MLP's gate/up GEMV or the MoE's fused
        # router at batch-1 decode (`forward_after_norm`, as in `LlamaDecoderLayer`).
        return self.mlp.forward_after_norm(self.post_attention_layernorm, hidden, residual)


class DeepseekV2Model(nn.Module):
    def __init__(self, config: Any, interleaved_rope: bool, mlp_bias: bool, routing: RoutingConfig | None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        dense = _num_dense_layers(config)
        self.layers = nn.ModuleList(DeepseekV2DecoderLayer(config, interleaved_rope, mlp_bias,
                                                           None if i < dense else routing)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        theta, scaling = rope_parameters(config)
        # Only the qk_rope_head_dim dims of q and of the shared key rotate.
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.max_position_embeddings, theta, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.prepare(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class DeepseekV2ForCausalLM(nn.Module):
    """DeepSeek-V2 (V2-Lite: `q_lora_rank` None)."""

    stacked_params = (
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    ignored_weights = ("rotary_emb.inv_freq",)

    def __init__(self, config: Any) -> None:
        super().__init__()
        check_supported(config)
        self.config = config
        routing = self.routing(config) if _num_dense_layers(config) < config.num_hidden_layers else None
        self.model = DeepseekV2Model(config, self.interleaved_rope(config), self.mlp_bias(config), routing)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)

    @staticmethod
    def interleaved_rope(config: Any) -> bool:
        return True  # HF's DeepSeek-V2 always rotates pairs (its complex-number form)

    @staticmethod
    def mlp_bias(config: Any) -> bool:
        return bool(getattr(config, "mlp_bias", False))

    @staticmethod
    def routing(config: Any) -> RoutingConfig:
        """DeepSeek-V2's experts: softmax scores, top-k (`greedy`) or top-k within the `topk_group`
        best of `n_group` groups by their best score (`group_limited_greedy`), never renormalised,
        times `routed_scaling_factor` (HF's DeepseekV2TopkRouter)."""
        _require(config, "scoring_func", "softmax")
        method = getattr(config, "topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"topk_method={method!r} is not supported for DeepSeek-V2 (greedy, group_limited_greedy)")
        if getattr(config, "norm_topk_prob", False):
            # (DeepSeek's own code renormalises where HF's does not: refuse rather than pick one.)
            raise ValueError("norm_topk_prob=True is not supported for DeepSeek-V2")
        grouped = method == "group_limited_greedy"
        return RoutingConfig(top_k=config.num_experts_per_tok, scoring="softmax",
                             num_expert_groups=config.n_group if grouped else None,
                             topk_groups=config.topk_group if grouped else None,
                             routed_scaling_factor=config.routed_scaling_factor)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits."""
        return self.lm_head.compute_logits(hidden)

    def skip_weight(self, name: str) -> bool:
        """Tied heads, and the multi-token-prediction layers DeepSeek-V3 checkpoints append after
        the last decoder layer (`model.layers.{num_hidden_layers}...`, speculative decoding only)."""
        if name == "lm_head.weight" and self.tie_word_embeddings:
            return True
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        return layer is not None and int(layer.group(1)) >= self.config.num_hidden_layers


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1, Kimi-K2, Moonlight."""

    @staticmethod
    def interleaved_rope(config: Any) -> bool:
        return bool(getattr(config, "rope_interleave", True))

    @staticmethod
    def mlp_bias(config: Any) -> bool:
        return False  # HF's DeepseekV3MLP has no bias

    @staticmethod
    def routing(config: Any) -> RoutingConfig:
        """DeepSeek-V3's experts (`noaux_tc`): sigmoid scores; the experts chosen by score +
        `e_score_correction_bias` within the `topk_group` best of `n_group` groups (a group's score:
        its two best); weights the chosen unbiased scores, renormalised if `norm_topk_prob`, times
        `routed_scaling_factor` (HF's DeepseekV3TopkRouter)."""
        _require(config, "scoring_func", "sigmoid")
        _require(config, "topk_method", "noaux_tc")
        return RoutingConfig(top_k=config.num_experts_per_tok, scoring="sigmoid",
                             renormalize=bool(config.norm_topk_prob), num_expert_groups=config.n_group,
                             topk_groups=config.topk_group, routed_scaling_factor=config.routed_scaling_factor,
                             correction_bias=True)


def _require(config: Any, field: str, value: str) -> None:
    """Refuse a routing field (where the config has it) naming another method than `value`."""
    found = getattr(config, field, value)
    if found != value:
        raise ValueError(f"{field}={found!r} is not supported for {_family(config)} ({value!r} only)")


def _family(config: Any) -> str:
    return (getattr(config, "architectures", None) or [config.model_type])[0]
