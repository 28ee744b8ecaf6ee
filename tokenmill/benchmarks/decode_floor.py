"""The bytes one batch-1 decode step must read, for the floor a decode latency is compared with:
every weight a token touches once, and its context's cached K/V.

Dense weights count whole. Of a mixture-of-experts layer's routed experts (`FusedMoE`'s stacked
`w13_weight` / `w2_weight`) one token reads `top_k` experts' matrices; the gate and the shared
experts count whole. The input embedding table is only gathered (one row), unless it is also the
LM head (tied). The floor in seconds is these bytes over the device's copy rate measured in the
same run (`kernels/copy_bandwidth.py`).
"""

from __future__ import annotations

import torch


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode token reads (this rank's shard)."""
    from tokenmill.model.layers.moe.fused_moe import FusedMoE

    expert_params: dict[int, float] = {}  # id(param) -> fraction a token reads
    for module in model.modules():
        if isinstance(module, FusedMoE):
            fraction = min(1.0, module.routing.top_k / module.num_experts)
            expert_params[id(module.w13_weight)] = expert_params[id(module.w2_weight)] = fraction
    tied = getattr(model, "tie_word_embeddings", False)
    total = 0.0
    for name, param in model.named_parameters():
        size = param.numel() * param.element_size()
        if name.endswith("embed_tokens.weight") and not tied:
            size = param.shape[-1] * param.element_size()  # one row gathered
        total += size * expert_params.get(id(param), 1.0)
    return int(total)


def decode_bytes_per_token(model: torch.nn.Module, kv_bytes_per_token: int, context_len: int) -> int:
    """Weights plus the cached K/V of a `context_len`-token context (all layers)."""
    return decode_weight_bytes(model) + kv_bytes_per_token * context_len
