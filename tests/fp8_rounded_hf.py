"""HF DeepSeek-V3 as an fp8 latent cache sees it: the reference of the MLA fp8-cache tests
(tests/models/test_mla_models.py on the CPU, tests/gpu/test_mla_gpu.py on the device)."""

from __future__ import annotations

import torch


def fp8_rounded_deepseek(model: torch.nn.Module):
    """HF DeepSeek-V3 whose cached latent and rotated rope key go through the fp8 format (unit
    scale), as tokenmill's fp8 latent cache stores them. Returns an undo function."""
    from transformers.models.deepseek_v3 import modeling_deepseek_v3

    from tokenmill.ops.kv_quant import quantize_fp8

    real_rope = modeling_deepseek_v3.apply_rotary_pos_emb_interleave

    def rope_then_round(q, k, *args, **kwargs):
        q, k = real_rope(q, k, *args, **kwargs)
        return q, quantize_fp8(k, 1.0).to(k.dtype)

    hooks = [layer.self_attn.kv_a_layernorm.register_forward_hook(
        lambda module, inputs, out: quantize_fp8(out, 1.0).to(out.dtype)) for layer in model.model.layers]
    modeling_deepseek_v3.apply_rotary_pos_emb_interleave = rope_then_round

    def undo():
        modeling_deepseek_v3.apply_rotary_pos_emb_interleave = real_rope
        for hook in hooks:
            hook.remove()
    return undo
