"""Tiny random HF models at real head layouts, saved as safetensors folders for the GPU tests."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    # Llama-style: head_dim 128, GQA 4, llama3 RoPE scaling, untied head.
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=2048, hidden_size=512,
                  intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=1,
                  head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
    # Qwen3-style: head_dim 128 decoupled from hidden/heads, q/k norm, tied embeddings.
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=2048, hidden_size=256,
                  intermediate_size=768, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                  head_dim=128, max_position_embeddings=4096, tie_word_embeddings=True),
    # SmolLM-style: head_dim 64, GQA 3.
    "smol": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=2048, hidden_size=576,
                 intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9, num_key_value_heads=3,
                 max_position_embeddings=4096, tie_word_embeddings=True),
}


def hf_folder(tmp_path_factory, name: str, initializer_range: float) -> tuple[str, torch.nn.Module]:
    values = dict(SHAPES[name])
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return str(folder), model.cuda().eval()
