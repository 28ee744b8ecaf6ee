"""The default CPU KV pool: sized from the model, max_model_len, max_num_seqs and the memory
available (tokenmill/config/kv_sizing.py), and what the engine does with it."""

from __future__ import annotations

import json

import pytest

from tokenmill.config.kv_sizing import (
    CPU_POOL_MAX_FRACTION, CPU_POOL_MIN_TOKENS, GiB, MiB, available_memory_bytes, default_cpu_kv_cache_bytes,
    fit_cpu_max_model_len, total_memory_bytes,
)

SMOLLM2_BF16 = 2 * 30 * 3 * 64 * 2  # K and V x 30 layers x 3 KV heads x 64 dims x 2 bytes
QWEN3_06B_FP32 = 2 * 28 * 8 * 128 * 4


def test_embedded_model_default_is_two_full_requests_not_two_gib():
    size, reason = default_cpu_kv_cache_bytes(SMOLLM2_BF16, 8192, 256, available_bytes=16 * GiB,
                                              total_bytes=24 * GiB)
    assert size == 2 * 8192 * SMOLLM2_BF16 == 360 * MiB
    assert "16384 tokens" in reason and "two requests of max_model_len 8192" in reason


def test_short_contexts_get_the_cpu_minimum_and_few_sequences_only_what_they_can_use():
    size, reason = default_cpu_kv_cache_bytes(SMOLLM2_BF16, 512, 256, 16 * GiB, 24 * GiB)
    assert size == CPU_POOL_MIN_TOKENS * SMOLLM2_BF16 and "CPU default" in reason
    size, reason = default_cpu_kv_cache_bytes(SMOLLM2_BF16, 512, 4, 16 * GiB, 24 * GiB)
    assert size == 4 * 512 * SMOLLM2_BF16 and "4 sequences" in reason


def test_capped_by_the_machine_share_not_by_a_busy_moment():
    size, reason = default_cpu_kv_cache_bytes(QWEN3_06B_FP32, 4096, 256, 16 * GiB, total_bytes=8 * GiB)
    assert size == 8 * GiB * CPU_POOL_MAX_FRACTION == 1 * GiB
    assert "1/8 of the machine's 8.0 GiB" in reason and "--kv-cache-memory" in reason
    # Little memory free right now: the same pool (same preemptions, same numerics), and a warning.
    busy, reason = default_cpu_kv_cache_bytes(QWEN3_06B_FP32, 4096, 256, available_bytes=1 * GiB,
                                              total_bytes=8 * GiB)
    assert busy == size and "more than half of the 1.0 GiB available now" in reason


def test_never_less_than_one_request_while_that_fits_half_the_machine():
    one = 8192 * QWEN3_06B_FP32  # 1.75 GiB, more than 1/8 of 8 GiB
    size, reason = default_cpu_kv_cache_bytes(QWEN3_06B_FP32, 8192, 256, 16 * GiB, total_bytes=8 * GiB)
    assert size == one and "one request of max_model_len 8192" in reason
    # One request past half the machine: the share, and the engine refuses with its message.
    size, reason = default_cpu_kv_cache_bytes(QWEN3_06B_FP32, 40960, 256, 16 * GiB, total_bytes=16 * GiB)
    assert size == 2 * GiB and "would need 8.8 GiB" in reason


def test_max_model_len_default_shrinks_to_what_the_share_holds():
    # Qwen3-0.6B allows 40960 tokens: 8.8 GiB of float32 KV for one request.
    length, note = fit_cpu_max_model_len(40960, QWEN3_06B_FP32, total_bytes=16 * GiB)
    assert length == 8192 and 8192 * QWEN3_06B_FP32 <= 16 * GiB * CPU_POOL_MAX_FRACTION
    assert "the model allows 40960" in note and "--max-model-len" in note
    assert fit_cpu_max_model_len(8192, SMOLLM2_BF16, total_bytes=16 * GiB) == (8192, None)
    assert fit_cpu_max_model_len(40960, QWEN3_06B_FP32, total_bytes=1 << 20)[0] == 256


def test_memory_is_measured():
    assert 0 < available_memory_bytes() <= total_memory_bytes() < 1 << 50


def _tiny_llama(folder, max_len):
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
        "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "max_position_embeddings": max_len}))
    return str(folder)


def test_engine_pool_follows_the_rule(tmp_path, monkeypatch):
    """The runner's default pool is the rule's size (no flat 2 GiB), and an explicit
    --kv-cache-memory still wins."""
    from tokenmill import LLM
    folder = _tiny_llama(tmp_path, 1024)
    per_token = 2 * 1 * 2 * 8 * 4  # K and V, 1 layer, 2 KV heads of 8, float32
    with LLM(folder, load_format="dummy", dtype="float32") as llm:  # 256 sequences
        assert llm.engine.core.kv_capacity_tokens == CPU_POOL_MIN_TOKENS
    with LLM(folder, load_format="dummy", dtype="float32", max_num_seqs=4) as llm:
        assert llm.engine.core.kv_capacity_tokens == 4 * 1024  # all 4 at full length, no more
    with LLM(folder, load_format="dummy", dtype="float32", kv_cache_memory=100 * per_token * 16) as llm:
        assert llm.engine.core.kv_capacity_tokens == 1600


def test_the_default_max_model_len_is_decided_once(monkeypatch):
    """The engine core and tensor-parallel ranks rebuild the config from `config.engine_args`: the
    CPU default context resolved in the API process travels with it, instead of being resolved
    again in another process (which may see another cgroup limit)."""
    from tokenmill.config import engine_args as config_module
    from tokenmill.config import EngineArgs
    monkeypatch.setattr(config_module, "total_memory_bytes", lambda: 4 * GiB)
    config = EngineArgs(model="qwen3-0.6b", load_format="dummy", dtype="float32").create_engine_config()
    assert config.model.max_model_len == 2048  # 4 GiB / 8 = 512 MiB at 224 KiB a token: 2340 -> 2048
    assert config.engine_args.max_model_len == 2048
    monkeypatch.setattr(config_module, "total_memory_bytes", lambda: 64 * GiB)
    assert config.engine_args.create_engine_config().model.max_model_len == 2048
    assert EngineArgs(model="qwen3-0.6b", load_format="dummy",
                      dtype="float32").create_engine_config().model.max_model_len == 32768
