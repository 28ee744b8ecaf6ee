"""The Llama family of decoders: Llama 2/3, SmolLM, Mistral, Qwen2 (QKV bias) and Qwen3 (Q/K norm).

These differ only in a few switches read from the HF config, so one module serves them all.
Tokens of all requests in a step are flattened into one batch: `input_ids` and `positions` are
`[num_tokens]`, hidden states `[num_tokens, hidden_size]`. HF weight names are kept, so loading a
checkpoint is a short mapping from HF's separate q/k/v and gate/up tensors onto merged matrices.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from tokenmill.distributed.parallel_state import EMBEDDING_SLOT
from tokenmill.model.attention.backend import AttentionBackend, AttentionMetadata, KVCache
from tokenmill.model.layers.basic import (
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    VocabParallelEmbedding,
    rope_parameters,
)
from tokenmill.model.layers import cpu_gemm
from tokenmill.model.layers.matmul import linear
from tokenmill.model.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          num_kv_heads, bias=qkv_bias)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size,
            bias=getattr(config, "o_proj_bias", False),
            input_slice=(self.qkv_proj.q_start * self.head_dim, self.qkv_proj.q_size), reduce_results=False,
            push_slot=0)  # summed by the post-attention norm (LlamaDecoderLayer.forward)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.backend = backend
        self.scale = self.head_dim ** -0.5
        # Per-tensor fp8 KV-cache scales (used only with kv_cache_dtype="fp8"): 1.0, uncalibrated,
        # as vLLM defaults to. A checkpoint with calibrated scales would set them here.
        self.k_scale = 1.0
        self.v_scale = 1.0

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, kv_cache: KVCache,
                meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size, kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        # The backend rotates q and k (on CUDA fused into its cache write: a launch per layer saved).
        out = self.backend.forward(q, k, v, kv_cache, meta, self.scale, self.k_scale, self.v_scale, rope=rope)
        return self.o_proj(out.reshape(out.shape[0], -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=bias)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=bias,
                                           reduce_results=False, push_slot=1)  # summed by the next input norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # down_proj(silu(gate) * up), the activation applied by down_proj: at batch-1 decode it
        # is fused into the GEMV (RowParallelLinear.forward_silu_mul).
        return self.down_proj.forward_silu_mul(self.gate_up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, backend, qkv_bias, qk_norm)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, rope, hidden, residual, kv_cache, meta):
        """`hidden`: the embeddings (first layer, `residual` None) or the previous layer's MLP
        output, as this rank's unreduced partial sums. Returns the same for the next layer.

        Each all-reduce (the vocab-parallel embedding's and each row-parallel projection's) is
        left to the norm that follows it, so that under tensor parallelism the sum, the residual
        add and the norm are one kernel. Slots 0 and 1 alternate as that kernel requires
        (attention 0, MLP 1, the final norm 1); the embeddings' sum has a slot of its own.
        """
        if residual is None:
            hidden, residual = self.input_layernorm.reduce_add(hidden, None, slot=EMBEDDING_SLOT)
        else:
            hidden, residual = self.input_layernorm.reduce_add(hidden, residual, slot=1)
        hidden = self.self_attn(rope, hidden, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm.reduce_add(hidden, residual, slot=0)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, backend: AttentionBackend, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, backend, qkv_bias, qk_norm) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta, scaling = rope_parameters(config)
        # One table for all layers (a 128k-position table is 64 MB).
        self.rotary = RotaryEmbedding(head_dim, config.max_position_embeddings, theta, scaling)

    def forward(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata):
        hidden = self.embed_tokens(input_ids, reduce=False)  # summed by the first layer's norm
        rope = self.rotary.cos_sin(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            hidden, residual = layer(rope, hidden, residual, kv_cache, meta)
        hidden, _ = self.norm.reduce_add(hidden, residual, slot=1)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Llama 2/3, SmolLM and Mistral (and, through two switches, Qwen2 and Qwen3)."""

    qkv_bias_default = False
    qk_norm = False

    # HF name fragment -> (merged parameter fragment, shard id)
    stacked_params = (
        ("qkv_proj", "q_proj", "q"),
        ("qkv_proj", "k_proj", "k"),
        ("qkv_proj", "v_proj", "v"),
        ("gate_up_proj", "gate_proj", 0),
        ("gate_up_proj", "up_proj", 1),
    )

    def __init__(self, config: Any, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        qkv_bias = getattr(config, "attention_bias", self.qkv_bias_default)
        self.model = LlamaModel(config, backend, qkv_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def pack_for_cpu(self) -> None:
        """oneDNN weight layouts for every GEMM, the LM head included (CPU only)."""
        for module in self.modules():
            if module is not self and hasattr(module, "pack_for_cpu"):
                module.pack_for_cpu()
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        self._packed_head = cpu_gemm.pack_weight(head.weight)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head
        logits = linear(hidden, head.weight, getattr(self, "_packed_head", None))
        from tokenmill.distributed.parallel_state import tp_all_gather_last_dim
        return tp_all_gather_last_dim(logits)[..., : self.config.vocab_size].float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Route each HF tensor to its (possibly merged, possibly sharded) parameter."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def loader_of(name: str):
            """The `weight_loader` of the module owning parameter `name` (where sharding happens),
            or None. Looked up here, not stored on the parameter: a bound method there would tie
            parameter and module in a cycle through the tensor, which Python's collector does not
            free (a shut-down engine's weights stayed on the GPU)."""
            return getattr(self.get_submodule(name.rpartition(".")[0]), "weight_loader", None)

        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.tie_word_embeddings:
                continue
            for merged, part, shard_id in self.stacked_params:
                if f".{part}." in name:
                    target = name.replace(part, merged)
                    param = params[target]
                    loader_of(target)(param, tensor.to(param.dtype), shard_id)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {name} has no matching parameter in "
                                     f"{type(self).__name__}")
                param = params[name]
                loader = loader_of(name)
                if loader is None:
                    if param.shape != tensor.shape:
                        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != "
                                         f"parameter shape {tuple(param.shape)}")
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor.to(param.dtype))
                loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
        return loaded


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias_default = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
