"""fp8 weights through the whole GPU path (Triton w8a8 GEMM and fp8 GEMV, CUDA graphs, the Triton
attention backend), on tiny random models at real head layouts. Skipped without an fp8 GPU
(compute capability 8.9+).

The reference is HF transformers on the dequantised weights (bf16). The GPU path also quantises
activations per token(-group) (w8a8, as DeepSeek's inference does), which the reference does not:
each generated position's top-20 log-probabilities must be within 10% (relative norm) of HF's. A
kernel that applied a scale to the wrong block or channel is off by far more (~100%).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)):
    pytest.skip("needs an fp8 GPU (compute capability 8.9+)", allow_module_level=True)

from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from fp8_checkpoints import save_block_fp8  # noqa: E402
from gpu_models import LOGIT_PARAMS, LOGIT_PROMPTS, SHAPES, greedy_eager_and_graphs  # noqa: E402
from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.ops.fp8_format import dequantize_weight_per_channel, quantize_weight_per_channel  # noqa: E402

ENGINE = dict(dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3)


def _hf(name: str, initializer_range: float) -> torch.nn.Module:
    values = dict(SHAPES[name])
    config = AutoConfig.for_model(values.pop("model_type"), initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def _block_fp8_folder(tmp_path_factory, name: str, initializer_range: float) -> tuple[str, torch.nn.Module]:
    folder = str(tmp_path_factory.mktemp(f"{name}_fp8"))
    model = save_block_fp8(_hf(name, initializer_range), folder)
    return folder, model.cuda()


def _assert_near_hf(hf: torch.nn.Module, outs, label: str, tolerance: float = 0.1) -> None:
    for prompt, out in zip(LOGIT_PROMPTS, outs):
        tokens = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([tokens], device="cuda")).logits[0].float(), -1)
        for j, position in enumerate(out.outputs[0].logprobs):
            ids = list(position)
            ours = torch.tensor([position[t].logprob for t in ids])
            theirs = ref[len(prompt) - 1 + j][ids].cpu()
            rel = float((ours - theirs).norm() / theirs.norm())
            assert rel < tolerance, (label, j, rel)


@pytest.mark.parametrize("cublas", [True, False], ids=["cublas_prefill", "triton_only"])
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_block_fp8_logprobs_near_hf(name, cublas, tmp_path_factory):
    """The prompts' first step holds 863 tokens: with `cublas`, its products go through cuBLAS's
    block-scaled GEMM (on Hopper), the decode steps through the Triton kernels."""
    folder, hf = _block_fp8_folder(tmp_path_factory, name, 0.05)
    with LLM(folder, block_size=16, cublas_fp8=cublas, **ENGINE) as llm:
        qkv = llm.engine.core.executor.driver_worker.model.model.layers[0].self_attn.qkv_proj
        assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.method.kernels
        hopper = torch.cuda.get_device_capability() == (9, 0)
        assert (qkv.method.cublas_rows is not None) == (cublas and hopper)
        outs = llm.generate(LOGIT_PROMPTS, LOGIT_PARAMS, use_tqdm=False)
    _assert_near_hf(hf, outs, name)


@pytest.mark.parametrize("cublas", [True, False], ids=["cublas_prefill", "triton_only"])
def test_online_fp8_logprobs_near_hf_on_the_same_quantisation(cublas, tmp_path_factory):
    hf = _hf("llama", 0.05)
    folder = str(tmp_path_factory.mktemp("llama_online"))
    hf.save_pretrained(folder)
    with torch.no_grad():
        for module_name, module in hf.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name != "lm_head":
                module.weight.copy_(dequantize_weight_per_channel(
                    *quantize_weight_per_channel(module.weight), torch.bfloat16))
    with LLM(folder, quantization="fp8", cublas_fp8=cublas, **ENGINE) as llm:
        qkv = llm.engine.core.executor.driver_worker.model.model.layers[0].self_attn.qkv_proj
        assert (qkv.method.cublas_rows is not None) == (cublas and torch.cuda.get_device_capability() == (9, 0))
        outs = llm.generate(LOGIT_PROMPTS, LOGIT_PARAMS, use_tqdm=False)
    _assert_near_hf(hf.cuda(), outs, "online")


def test_block_fp8_cuda_graphs_match_eager(tmp_path_factory):
    folder, _ = _block_fp8_folder(tmp_path_factory, "qwen3", 0.5)  # peaky logits
    eager, graphs, graphs_async = greedy_eager_and_graphs(folder, dtype="bfloat16")
    assert eager == graphs == graphs_async


def test_batch1_decode_runs_the_fp8_gemv(tmp_path_factory, monkeypatch):
    """One-row products (batch-1 decode, eager or in a graph) run the weight-only fp8 GEMV, the
    MLP's down projection with SiLU-and-mul fused; eager and graphs give the same tokens."""
    from tokenmill.ops import fp8_gemv

    calls = []
    real = fp8_gemv.fp8_gemv
    monkeypatch.setattr(fp8_gemv, "fp8_gemv", lambda x, w, s, block, silu_mul=False, config=None, **kw:
                        calls.append(silu_mul) or real(x, w, s, block, silu_mul, config, **kw))
    folder, _ = _block_fp8_folder(tmp_path_factory, "llama", 0.5)
    prompt = [[(13 * i) % 2048 for i in range(77)]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = []
    for eager in (True, False):
        calls.clear()
        with LLM(folder, enforce_eager=eager, max_num_seqs=4, **ENGINE) as llm:
            results.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
        assert calls and any(calls)
        torch.cuda.empty_cache()
    assert results[0] == results[1]


def test_block_fp8_with_fp8_kv_cache_and_prefix_caching(tmp_path_factory):
    """fp8 weights beside an fp8 KV cache: prompts sharing a 256-token prefix give the same greedy
    tokens with prefix caching (the prefix read back from cached fp8 blocks) as without.

    A fresh prefill attends over its own exact K/V and only a cached prefix is read back rounded to
    e4m3 (as in vLLM), so "without" is a 256-token chunked prefill: its second chunk reads the
    first 256 tokens back from fp8 blocks just as a cache hit does, and both runs compute the same
    numbers. One prompt at a time, so the batches match too."""
    folder, _ = _block_fp8_folder(tmp_path_factory, "llama", 0.5)
    prefix = [(7 * i + 1) % 2048 for i in range(256)]
    prompts = [prefix + [(5 * i + j) % 2048 for i in range(9 + j)] for j in range(4)]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    results = []
    for caching in (False, True):
        with LLM(folder, kv_cache_dtype="fp8", enable_prefix_caching=caching, max_num_batched_tokens=256,
                 **ENGINE) as llm:
            llm.generate(prompts[:1], params, use_tqdm=False)  # fills the cache with the prefix
            outs = [llm.generate([p], params, use_tqdm=False)[0] for p in prompts]
            assert [o.num_cached_tokens for o in outs] == ([256] * 4 if caching else [0] * 4)
            results.append([o.outputs[0].token_ids for o in outs])
        torch.cuda.empty_cache()
    assert results[0] == results[1]


def test_fp8_weights_compile_nothing_after_start_up(tmp_path):
    """The fp8 kernels (activation quantisation, GEMM buckets, GEMV) are all compiled and tuned at
    start-up (profile run, graph capture): chunked prefills beside decode batches of changing sizes
    write nothing to a fresh Triton cache (as `test_gpu_model.test_no_triton_compiles_after_start_up`
    checks for bf16)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "timeline.json"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    torch.cuda.empty_cache()
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill.benchmarks.step_timeline", "--model", "qwen3-0.6b", "--quantization", "fp8",
         "--num-prompts", "48", "--input-len", "200", "--output-len", "24", "--max-model-len", "512",
         "--max-num-batched-tokens", "1024", "--gpu-memory-utilization", "0.3", "--no-warmup",
         "--output-json", str(out)],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    timeline = json.loads(out.read_text())
    assert timeline["prefill_steps"] >= 8
    assert timeline["triton_cache_files_written"] == 0, timeline["kernels_compiled_while_timed"]
