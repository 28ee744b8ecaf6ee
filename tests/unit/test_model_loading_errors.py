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


def _tiny_llama(folder, max_len):
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": max_len}))
    return str(folder)


def test_kv_pool_smaller_than_one_request_is_refused(tmp_path, monkeypatch, caplog):
    """A default pool that cannot hold one request of max_model_len (here: one request would need
    more than half the machine) would leave such a request waiting forever: the engine refuses to
    start and names the fix. An explicitly sized pool is taken as asked, with a warning."""
    from tokenmill import LLM
    from tokenmill.config.kv_sizing import CPU_POOL_MAX_FRACTION
    from tokenmill.worker import worker
    folder = _tiny_llama(tmp_path, 4096)
    per_token = 2 * 1 * 2 * 8 * 4  # K and V, 1 layer, 2 KV heads of 8, float32
    # A "machine" whose default share (1/8) is 256 tokens and whose half is 1024.
    monkeypatch.setattr(worker, "total_memory_bytes", lambda: int(256 * per_token / CPU_POOL_MAX_FRACTION))
    with pytest.raises(ValueError, match=r"fits only 256 tokens.*max_model_len 4096.*at most 256"):
        LLM(folder, load_format="dummy", dtype="float32", max_model_len=4096)
    with LLM(folder, load_format="dummy", dtype="float32", max_model_len=1024) as llm:
        assert llm.engine.core.kv_capacity_tokens == 1024  # one request: the floor
    with LLM(folder, load_format="dummy", dtype="float32", max_model_len=4096,
             kv_cache_memory=1024 * per_token) as llm:
        assert llm.engine.core.kv_capacity_tokens == 1024
    assert "less than max_model_len 4096" in caplog.text


def test_cli_prints_the_error_alone(capsys):
    """The `tokenmill` command reports what the user can fix as one line and exit status 1, not a
    traceback (which `--log-level debug` still shows)."""
    from tokenmill.entrypoints.cli.main import main
    assert main(["chat", "--model", "/no/such"]) == 1
    err = capsys.readouterr().err
    # The start-up lines ("tokenmill: loading /no/such") come first; the error is the last line.
    assert err.splitlines()[-1].startswith("tokenmill: error: model '/no/such' not found")
    assert "Traceback" not in err
    with pytest.raises(ValueError, match="not found"):
        main(["--log-level", "debug", "chat", "--model", "/no/such"])
