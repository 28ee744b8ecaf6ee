"""Clear errors for a missing path, an unsupported architecture and corrupt weight files."""

import json

import pytest

from tokenmill.config import EngineArgs


def test_missing_path_names_the_model():
    with pytest.raises(ValueError, match="not found.*never downloaded"):
        EngineArgs(model="/no/such/model").create_engine_config()


def test_unknown_shape_name_lists_shipped_shapes():
    with pytest.raises(ValueError, match="llama-3.1-8b"):
        EngineArgs(model="gpt-5").create_engine_config()


def test_folder_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        EngineArgs(model=str(tmp_path)).create_engine_config()


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1, "n_embd": 8, "n_head": 2}))
    from tokenmill import LLM
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        LLM(str(tmp_path), load_format="dummy", kv_cache_memory=1 << 20)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 100)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        EngineArgs(model=str(bad)).create_engine_config()


def test_corrupt_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    from tokenmill import LLM
    with pytest.raises(ValueError, match="not a readable safetensors"):
        LLM(str(tmp_path), kv_cache_memory=1 << 20)


def test_wrong_load_format_for_a_gguf_file(default_gguf_path):
    with pytest.raises(ValueError, match="GGUF file"):
        EngineArgs(model=default_gguf_path, load_format="safetensors").create_engine_config()
