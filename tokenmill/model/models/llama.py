"""The Llama family of decoders: Llama 2/3, SmolLM, Mistral, Qwen2 (QKV bias) and Qwen3 (Q/K norm).

These differ only in a few switches read from the HF config, so one module serves them all; a
sliding window (Mistral, Qwen2/3 with `use_sliding_window`) is a per-layer setting of the attention
(`config/attention_layout.py`), and `config/model_checks.py` refuses any field not handled here.
Tokens of all requests in a step are flattened into one batch: `input_ids` and `positions` are
`[num_tokens]`, hidden states `[num_tokens, hidden_size]`. HF weight names are kept, so loading a
checkpoint is a short mapping from HF's separate q/k/v and gate/up tensors onto merged matrices
(`model/loader/weights.load_weights`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from tokenmill.config.attention_layout import attention_layout
from tokenmill.model.attention.backend import AttentionMetadata, KVCache
from tokenmill.model.attention.layer import Attention
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.linear import QKVParallelLinear, RowParallelLinear
from tokenmill.model.layers.mlp import GatedMLP
from tokenmill.model.layers.rotary_embedding import RotaryEmbedding, RotaryInputs, rope_parameters
from tokenmill.model.layers.vocab_embedding import ParallelLMHead, VocabParallelEmbedding


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dim_of(config: Any) -> int:
    """The rotated dims of each head: all of them, or `partial_rotary_factor` of them (HF's
    `rope_parameters` or the config's own field)."""
    params = getattr(config, "rope_parameters", None)
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = getattr(config, "partial_rotary_factor", None) or 1.0
    return int(head_dim_of(config) * factor)


class LlamaAttention(nn.Module):
    """`o_bias`: a bias on o_proj (HF's Llama and Qwen3 with `attention_bias`); `sliding_window`:
    the layer's window, None for full attention."""

    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool, o_bias: bool = False,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        head_dim = head_dim_of(config)
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads,
                                          num_kv_heads, bias=qkv_bias)
        # This rank's columns follow its query heads (which may be uneven across ranks).
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * head_dim, config.hidden_size, bias=o_bias,
            input_slice=(self.qkv_proj.q_start * head_dim, self.qkv_proj.q_size))
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps) if qk_norm else None
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, head_dim ** -0.5,
                              sliding_window, qk_norm=(self.q_norm, self.k_norm) if qk_norm else None)

    def forward(self, hidden: torch.Tensor, rope: RotaryInputs, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        return self._attend(self.qkv_proj(hidden), rope, kv_cache, meta)

    def forward_after_norm(self, norm: RMSNorm, hidden: torch.Tensor, residual: torch.Tensor | None,
                           rope: RotaryInputs, kv_cache: KVCache, meta: AttentionMetadata
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(forward(norm(hidden + residual)), hidden + residual)`: the norm may run inside the
        QKV projection (`RMSNorm.forward_then`)."""
        qkv, residual = norm.forward_then(self.qkv_proj, hidden, residual)
        return self._attend(qkv, rope, kv_cache, meta), residual

    def _attend(self, qkv: torch.Tensor, rope: RotaryInputs, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj.split_qkv(qkv)
        # attn applies q_norm / k_norm (Qwen3), then the rotation: on the GPU in one kernel.
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, rope))


class LlamaDecoderLayer(nn.Module):
    """`mlp`: the feed-forward block (default: the config's gated MLP; a MoE model passes its own,
    with the same `forward_after_norm`). `o_bias`, `sliding_window`: as `LlamaAttention`'s.

    Each half is `module.forward_after_norm(norm, hidden, residual, ...)`: the module may run the
    norm inside its first kernel (batch-1 decode: the QKV GEMV, the gate/up GEMV, the MoE router)."""

    def __init__(self, config: Any, qkv_bias: bool, qk_norm: bool, mlp: nn.Module | None = None,
                 o_bias: bool = False, sliding_window: int | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm, o_bias, sliding_window)
        self.mlp = mlp if mlp is not None else GatedMLP(
            config.hidden_size, config.intermediate_size, bias=getattr(config, "mlp_bias", False),
            hidden_act=getattr(config, "hidden_act", "silu"))
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: RotaryInputs,
                kv_cache: KVCache, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-norm residual block; `residual` is None on the first layer. Returns (hidden, residual)."""
        hidden, residual = self.self_attn.forward_after_norm(self.input_layernorm, hidden, residual, rope,
                                                             kv_cache, meta)
        return self.mlp.forward_after_norm(self.post_attention_layernorm, hidden, residual)


class LlamaModel(nn.Module):
    """Embedding, `make_layer(i)` for each decoder layer i (a module called as `layer(hidden,
    residual, rope, kv_cache, meta) -> (hidden, residual)`), the final norm and the rotary table."""

    def __init__(self, config: Any, make_layer: Callable[[int], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        theta, scaling = rope_parameters(config)
        # One table for all layers (a 128k-position table is 64 MB).
        self.rotary_emb = RotaryEmbedding(rotary_dim_of(config), config.max_position_embeddings, theta, scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb.prepare(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3, SmolLM and Mistral (and, through two switches, Qwen2 and Qwen3). Families with
    other decoder layers (mixtures of experts) subclass it and override `decoder_layer`."""

    qkv_bias_default = False
    # HF's Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 biases only q, k and v.
    o_bias_with_qkv = True
    qk_norm = False

    # HF name fragment -> (merged parameter fragment, shard id)
    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )
    # Checkpoint tensors with no parameter here (recomputed, not loaded).
    ignored_weights = ("rotary_emb.inv_freq",)

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, lambda index: self.decoder_layer(config, index))
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)

    def decoder_layer(self, config: Any, index: int) -> nn.Module:
        """Decoder layer `index` of the model; Mistral's window covers every layer, Qwen2/3's the
        layers their layer_types name."""
        qkv_bias = bool(getattr(config, "attention_bias", self.qkv_bias_default))
        window = attention_layout(config, config.architectures[0]).window(index)
        return LlamaDecoderLayer(config, qkv_bias, self.qk_norm, o_bias=qkv_bias and self.o_bias_with_qkv,
                                 sliding_window=window)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits."""
        return self.lm_head.compute_logits(hidden)

    def skip_weight(self, name: str) -> bool:
        return name == "lm_head.weight" and self.tie_word_embeddings


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True
    o_bias_with_qkv = False


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
