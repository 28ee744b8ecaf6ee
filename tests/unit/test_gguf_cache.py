"""The GGUF file converted once into an HF folder in the user cache (tokenmill/config/gguf_cache.py): the
folder holds exactly what the GGUF path computes (config, dequantized weights, tokenizer and chat
template), later starts reuse it, and an unwritable cache falls back to reading the GGUF."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.config import gguf_cache
from tokenmill.config.model_source import resolve_model_source

pytestmark = pytest.mark.slow


@pytest.fixture()
def converted(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENMILL_CACHE", str(tmp_path / "cache"))
    source = resolve_model_source(None)
    return source, gguf_cache.use_cached_conversion(source)


def test_converted_folder_matches_the_gguf(converted):
    from safetensors.torch import load_file

    from tokenmill.config.gguf_metadata import gguf_hf_config
    from tokenmill.config.gguf_weights import iter_gguf_weights
    from tokenmill.config.tokenizer import load_tokenizer

    gguf, folder = converted
    assert (folder.kind, folder.load_format, folder.display_name) == ("hf", "safetensors", gguf.display_name)
    assert folder.path.startswith(os.environ["TOKENMILL_CACHE"]) and folder.tokenizer_path == folder.path

    expected = gguf_hf_config(gguf.path).to_dict()
    actual = folder.load_hf_config().to_dict()
    for key in ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "rope_parameters"):
        assert actual.get(key) == expected.get(key), key

    saved = load_file(os.path.join(folder.path, "model.safetensors"))
    reference = dict(iter_gguf_weights(gguf.path, gguf_hf_config(gguf.path)))
    assert saved.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(saved[name], tensor), name  # bit for bit: what dequantization gives

    direct, cached = load_tokenizer(gguf.path), load_tokenizer(folder.tokenizer_path)
    text = "Hello, tokenmill! Ünïcödé and numbers 12345."
    assert cached.encode(text) == direct.encode(text)
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert (cached.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == direct.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))


def test_a_second_start_reuses_the_conversion(converted, monkeypatch):
    gguf, first = converted

    def no_second_conversion(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(gguf_cache, "_convert", no_second_conversion)
    assert gguf_cache.use_cached_conversion(gguf) == first


def test_an_unwritable_cache_reads_the_gguf(tmp_path, monkeypatch):
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    monkeypatch.setenv("TOKENMILL_CACHE", str(blocked))  # mkdir under a file fails
    source = resolve_model_source(None)
    assert gguf_cache.use_cached_conversion(source) == source
