"""`kv_cache_dtype="fp8"` end to end on the CPU, on a tiny random float32 Llama.

The fp8 engine's log-probabilities (prompt positions through chunked prefill, which reads each
chunk's prefix from the cache, and generated tokens through paged decode) are compared with the
model-dtype cache's on the same tokens: teacher-forced, so a diverging greedy path cannot hide or
fake a difference. On this model fp8 K/V move the log-probabilities by ~0.1 nats on average (as
much as 2.5% random noise on K/V does); a cache read back 10% too large or small moves them by
~0.3, an unreadable one by more than 1.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

CONFIG = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, rms_norm_eps=1e-6, architectures=["LlamaForCausalLM"],
              tie_word_embeddings=False)
PROMPT = [(7 * i + 3) % 160 for i in range(37)]
NEW_TOKENS = 16
# Small pool, 4-token blocks, 8-token chunks: prefixes are read back from the cache.
ENGINE = dict(dtype="float32", block_size=4, enable_prefix_caching=False, kv_cache_memory=1 << 20,
              max_num_batched_tokens=8)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **CONFIG), dtype=torch.float32)
    folder = tmp_path_factory.mktemp("tiny_llama_fp8")
    model.save_pretrained(folder)
    return str(folder)


def _fp8_logprobs(llm: LLM) -> tuple[list[int], list[float]]:
    """Greedy generation; (prompt + generated tokens, logprob of each token after the first)."""
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=1, prompt_logprobs=1, ignore_eos=True)
    out = llm.generate([PROMPT], params, use_tqdm=False)[0]
    generated = out.outputs[0].token_ids
    assert len(generated) == NEW_TOKENS
    logprobs = [out.prompt_logprobs[i][PROMPT[i]].logprob for i in range(1, len(PROMPT))]
    logprobs += [out.outputs[0].logprobs[j][token].logprob for j, token in enumerate(generated)]
    return PROMPT + generated, logprobs


def _teacher_forced(llm: LLM, tokens: list[int]) -> list[float]:
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1)
    out = llm.generate([tokens], params, use_tqdm=False)[0]
    return [out.prompt_logprobs[i][tokens[i]].logprob for i in range(1, len(tokens))]


def test_fp8_logprobs_close_to_model_dtype_cache(tiny_llama):
    with LLM(tiny_llama, kv_cache_dtype="fp8", **ENGINE) as llm:
        assert all(k.dtype == v.dtype == torch.float8_e4m3fn for k, v in
                   llm.engine.core.executor.driver_worker.runner.kv_caches)
        tokens, fp8 = _fp8_logprobs(llm)
    with LLM(tiny_llama, **ENGINE) as llm:
        ref = _teacher_forced(llm, tokens)
    diff = (torch.tensor(fp8) - torch.tensor(ref)).abs()
    decode = diff[len(PROMPT):]  # tokens sampled after a decode step
    assert diff.mean() > 1e-3, "the fp8 cache changed nothing: is it really fp8?"
    assert diff.mean() < 0.2, diff
    assert decode.mean() < 0.3, decode


@pytest.mark.parametrize("dtype,ratio", [("float32", 4), ("bfloat16", 2)])
def test_fp8_pool_holds_more_blocks(tiny_llama, dtype, ratio):
    """Same bytes for the pool, one byte per element instead of 4 (float32) or 2 (bfloat16)."""
    kwargs = dict(ENGINE, dtype=dtype)
    with LLM(tiny_llama, **kwargs) as llm:
        auto_worker = llm.engine.core.executor.driver_worker
        auto_blocks, auto_bytes = auto_worker.num_blocks, auto_worker.runner.kv_cache_bytes_per_block()
        assert llm.engine.core.kv_manager.pool.num_blocks == auto_blocks
    with LLM(tiny_llama, kv_cache_dtype="fp8", **kwargs) as llm:
        worker = llm.engine.core.executor.driver_worker
        bytes_per_block = worker.runner.kv_cache_bytes_per_block()
        assert bytes_per_block * ratio == auto_bytes
        assert worker.num_blocks == ENGINE["kv_cache_memory"] // bytes_per_block
        assert ratio * auto_blocks <= worker.num_blocks < ratio * (auto_blocks + 1)
        assert worker.runner.kv_caches[0][0].element_size() == 1
        assert llm.engine.core.kv_manager.pool.num_blocks == worker.num_blocks


@pytest.mark.slow
def test_fp8_reaches_tensor_parallel_workers(tiny_llama):
    """Two ranks with fp8 caches give one fp8 rank's log-probabilities: had rank 1 (a separate
    process, building its config from the driver's EngineArgs) kept float32 K/V for its heads,
    the result would sit between the fp8 and float32 ones."""
    with LLM(tiny_llama, kv_cache_dtype="fp8", **ENGINE) as llm:
        tokens, one_rank = _fp8_logprobs(llm)
    with LLM(tiny_llama, **ENGINE) as llm:
        ref = _teacher_forced(llm, tokens)
    with LLM(tiny_llama, kv_cache_dtype="fp8", tensor_parallel_size=2, **ENGINE) as llm:
        got_tokens, two_ranks = _fp8_logprobs(llm)
    assert got_tokens == tokens
    to_fp32 = (torch.tensor(one_rank) - torch.tensor(ref)).abs().mean()
    between_ranks = (torch.tensor(two_ranks) - torch.tensor(one_rank)).abs().mean()
    assert between_ranks < to_fp32 / 20, (between_ranks, to_fp32)
