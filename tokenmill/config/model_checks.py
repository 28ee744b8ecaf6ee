"""Start-up checks: every HF config field that changes a supported model's math is either
implemented or refused here, with the field named, before any weight is loaded.

A field tokenmill does not implement must never be ignored: a Mistral served without its window
produces fluent, wrong tokens. docs/models.md ("Config fields") lists each field with what
tokenmill does with it; this module is that table in code. Fields that only matter for training
(`attention_dropout`, `router_jitter_noise`, `router_aux_loss_coef`, `initializer_range`) or for
bookkeeping (token ids, `use_cache`, `torch_dtype`) change nothing at inference and pass.
"""

from __future__ import annotations

from typing import Any

from tokenmill.config.attention_layout import UnsupportedModelConfig, attention_layout

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
HYBRID_FAMILY = ("MiniMaxForCausalLM",)
# MiniMax-Text-01 / M1 remote-code names -> HF's MiniMaxConfig names.
LEGACY_MINIMAX_FIELDS = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}
# RoPE variants `model/layers/rotary_embedding.py` computes as HF does.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_fields(hf_config: Any) -> dict:
    """The RoPE settings as one dict: transformers 5's `rope_parameters`, or 4's `rope_scaling`
    with `rope_theta` beside it (either may be absent: plain RoPE)."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and params:
        return dict(params)
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    return dict(scaling)


def rope_type(hf_config: Any) -> str:
    fields = rope_fields(hf_config)
    return fields.get("rope_type", fields.get("type", "default")) or "default"


def _check_rope(architecture: str, hf_config: Any, allow_partial: bool) -> None:
    kind = rope_type(hf_config)
    if kind not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelConfig(architecture, "rope_scaling.rope_type", kind,
                                     f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    factor = rope_fields(hf_config).get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if factor is not None and float(factor) != 1.0 and not allow_partial:
        raise UnsupportedModelConfig(architecture, "partial_rotary_factor", factor,
                                     "this family rotates the whole head in HF's default RoPE")
    if factor is not None and not 0.0 < float(factor) <= 1.0:
        raise UnsupportedModelConfig(architecture, "partial_rotary_factor", factor)


def _check_activation(architecture: str, hf_config: Any) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelConfig(architecture, "hidden_act", act, "supported: silu")


def _check_minimax(architecture: str, hf_config: Any) -> None:
    # The original (remote-code) checkpoints' switches; HF's MiniMax hard-codes these values.
    if getattr(hf_config, "postnorm", True) is not True:
        raise UnsupportedModelConfig(architecture, "postnorm", hf_config.postnorm,
                                     "the residual is the normed input (postnorm: true), as in HF's MiniMax")
    shared = getattr(hf_config, "shared_intermediate_size", 0) or 0
    if shared:
        raise UnsupportedModelConfig(architecture, "shared_intermediate_size", shared,
                                     "MiniMax shared experts are not implemented")
    # The original checkpoints' names for fields HF renamed: honoured only where they agree.
    for legacy, field in LEGACY_MINIMAX_FIELDS.items():
        if hasattr(hf_config, legacy) and float(getattr(hf_config, legacy)) != float(getattr(hf_config, field)):
            raise UnsupportedModelConfig(architecture, legacy, getattr(hf_config, legacy),
                                         f"disagrees with {field}={getattr(hf_config, field)!r} (rename it)")
    attn_types = getattr(hf_config, "attn_type_list", None)
    if attn_types is not None:
        kinds = ["full_attention" if t == 1 else "linear_attention" for t in attn_types]
        if list(getattr(hf_config, "layer_types", None) or kinds) != kinds:
            raise UnsupportedModelConfig(architecture, "attn_type_list", attn_types,
                                         "disagrees with layer_types (1: full_attention, 0: linear_attention)")
    rotary_dim = getattr(hf_config, "rotary_dim", None)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if rotary_dim is not None and (rotary_dim % 2 or not 0 < rotary_dim <= head_dim):
        raise UnsupportedModelConfig(architecture, "rotary_dim", rotary_dim,
                                     f"an even number of dims up to head_dim ({head_dim})")


def check_model_config(hf_config: Any, architecture: str) -> None:
    """Raise `UnsupportedModelConfig` (a ValueError naming the field) for anything in the config
    of a supported decoder that tokenmill would otherwise compute differently from HF."""
    if architecture in LLAMA_FAMILY:
        _check_rope(architecture, hf_config, allow_partial=False)
        _check_activation(architecture, hf_config)
        attention_layout(hf_config, architecture)
    elif architecture in HYBRID_FAMILY:
        _check_rope(architecture, hf_config, allow_partial=True)
        _check_activation(architecture, hf_config)
        _check_minimax(architecture, hf_config)
        attention_layout(hf_config, architecture)
