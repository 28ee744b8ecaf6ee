"""`quantization="gguf"`: the embedded Q4_1 GGUF with its linear weights kept in their blocks
(`GgufLinearMethod`, torch's int4 CPU kernel) against the same file dequantised at load.

Tolerance: in float32 the two compute the same weights (scale and zero exact in float32), so
prompt log-probabilities agree within 2e-3 nats and greedy tokens are identical; in bfloat16 the
4-bit kernel's scales and zeros are rounded to bf16 (llama.cpp keeps fp16), and log-probabilities
of the dequantised model's greedy tokens agree within 0.15 nats on average. With `--cpu-compile`
the float32 engine gives the eager one's tokens.
"""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Write a haiku about the sea.",
           "Q: What is 12 times 12?\nA:"]


def _run(dtype: str, quantization: str | None, cpu_compile: bool = False):
    llm = LLM(dtype=dtype, quantization=quantization, cpu_compile=cpu_compile, max_model_len=256,
              kv_cache_memory=64 << 20)
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=0)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        model = llm.engine.core.executor.driver_worker.model
        method = type(model.model.layers[0].mlp.down_proj.method).__name__
        tokens = [o.outputs[0].token_ids for o in outs]
        prompt_lps = [[next(iter(p.values())).logprob for p in o.prompt_logprobs[1:]] for o in outs]
        return method, tokens, prompt_lps
    finally:
        llm.shutdown()


def test_q4_1_kept_quantised_matches_dequantised_float32():
    method, tokens, lps = _run("float32", "gguf")
    ref_method, ref_tokens, ref_lps = _run("float32", None)
    assert (method, ref_method) == ("GgufLinearMethod", "CpuLinearMethod")
    assert tokens == ref_tokens
    worst = max(abs(a - b) for row, ref in zip(lps, ref_lps) for a, b in zip(row, ref))
    assert worst < 2e-3


def test_q4_1_kept_quantised_matches_dequantised_bfloat16():
    _, _, lps = _run("bfloat16", "gguf")
    _, _, ref_lps = _run("bfloat16", None)
    diffs = [abs(a - b) for row, ref in zip(lps, ref_lps) for a, b in zip(row, ref)]
    assert sum(diffs) / len(diffs) < 0.15


@pytest.mark.slow
def test_q4_1_kept_quantised_compiled_matches_eager_float32():
    """`--cpu-compile` over the 4-bit kernel (the graph calls torch's int4 op with the packed weight,
    and the C++ decode op) computes what the eager engine does: the same greedy tokens, prompt
    log-probabilities within float32 rounding."""
    method, tokens, lps = _run("float32", "gguf", cpu_compile=True)
    _, ref_tokens, ref_lps = _run("float32", "gguf")
    assert method == "GgufLinearMethod"
    assert tokens == ref_tokens
    worst = max(abs(a - b) for row, ref in zip(lps, ref_lps) for a, b in zip(row, ref))
    assert worst < 1e-4


def test_quantization_gguf_refused_where_it_cannot_apply(tmp_path):
    from tokenmill.config import EngineArgs

    with pytest.raises(ValueError, match="quantization"):
        EngineArgs(quantization="awq").create_engine_config()
    with pytest.raises(ValueError, match="one CPU rank"):
        EngineArgs(quantization="gguf", tensor_parallel_size=2).create_engine_config()
