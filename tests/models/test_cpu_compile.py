"""`cpu_compile`: the inductor-compiled CPU forward (`worker/cpu_compile.py`) against HF
transformers on a tiny random Llama, through batch-1 decode, batched decode and prefill (its two
graphs), and the refusals of settings it cannot honour."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

PROMPTS = [[(7 * i + 3) % 160 for i in range(23)], [(5 * i + 1) % 160 for i in range(9)]]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    config = AutoConfig.for_model("llama", vocab_size=160, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    return str(folder), model


def _hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("native_decode", [True, False], ids=["native-decode", "sdpa-decode"])
def test_compiled_cpu_forward_matches_hf(tiny_llama, native_decode):
    folder, hf_model = tiny_llama
    llm = LLM(folder, dtype="float32", cpu_compile=True, block_size=4, max_model_len=128,
              kv_cache_memory=16 << 20, cpu_native_decode=native_decode)
    try:
        runner = llm.engine.core.executor.driver_worker.runner
        assert type(runner._forward).__name__ == "CompiledCpuForward"
        assert llm.engine.config.kernels.attention_backend == "cpu"
        assert llm.engine.config.kernels.cpu_native_decode == native_decode
        # The C++ greedy pick comes with the native decode (where the kernels build: CI has a compiler).
        assert (runner.sampler.argmax.__module__ == "tokenmill.ops.cpu_argmax") == native_decode
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        together = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        alone = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    expected = [_hf_greedy(hf_model, p, 8) for p in PROMPTS]
    assert together == expected
    assert alone == expected[0]


def test_compiled_bf16_decode_runs_the_gemv(tiny_llama):
    """bf16 weights: a batch-1 decode step's linears inside the compiled graph (and the LM head)
    are the C++ GEMV; the tokens are HF's on the same bf16-rounded weights (computed in float32:
    this tiny model's logits are far apart, so bf16 rounding of the activations changes no pick)."""
    from tokenmill.ops import cpu_gemv

    if not cpu_gemv.available():
        pytest.skip("no C++ toolchain to build the kernel")
    folder, hf_model = tiny_llama
    rounded = copy.deepcopy(hf_model)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())
    llm = LLM(folder, dtype="bfloat16", cpu_compile=True, block_size=4, max_model_len=128, kv_cache_memory=16 << 20)
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            out = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    finally:
        llm.shutdown()
    calls = {e.key: e.count for e in prof.key_averages()}
    # 7 decode steps x 2 layers x 4 linears, and the LM head at all 8 steps (the prompt's step
    # computes logits for its last row only); the prompt's own linears are oneDNN's.
    assert calls.get("tokenmill::cpu_gemv") == 7 * 2 * 4 + 8
    assert out == _hf_greedy(rounded, PROMPTS[0], 8)


def test_compiled_with_one_request_at_a_time(tiny_llama):
    """max_num_seqs=1: the start-up compile of the multi-token graph fits its step in one request."""
    folder, hf_model = tiny_llama
    llm = LLM(folder, dtype="float32", cpu_compile=True, block_size=4, max_model_len=128,
              kv_cache_memory=16 << 20, max_num_seqs=1)
    try:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        outputs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert outputs == [_hf_greedy(hf_model, p, 6) for p in PROMPTS]


def test_several_compiled_engines_in_one_process(tiny_llama):
    """Five compiled engines alive at once (each adds two graphs to dynamo's cache of the model's
    forward), then shut down: every one serves HF's tokens."""
    folder, hf_model = tiny_llama
    engines = [LLM(folder, dtype="float32", cpu_compile=True, block_size=4, max_model_len=64,
                   kv_cache_memory=4 << 20) for _ in range(5)]
    try:
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        outputs = [llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids for llm in engines]
    finally:
        for llm in engines:
            llm.shutdown()
    assert outputs == [_hf_greedy(hf_model, PROMPTS[0], 3)] * 5


def test_engines_with_other_weights_never_run_each_others_graphs(tiny_llama, tmp_path):
    """Steps skip dynamo's full guard check once both graphs ran under it. Two engines of the same
    architecture and other weights, interleaved, each serve their own model's tokens; when one shuts
    down (resetting dynamo's cache), or anything resets it, the other stops skipping until it has
    compiled and checked both of its graphs again, and still serves its own tokens."""
    folder, hf_model = tiny_llama
    torch.manual_seed(1)
    other_model = AutoModelForCausalLM.from_config(hf_model.config, dtype=torch.float32).eval()
    other_model.save_pretrained(tmp_path)
    args = dict(dtype="float32", cpu_compile=True, block_size=4, max_model_len=64, kv_cache_memory=4 << 20)
    first, second = LLM(folder, **args), LLM(str(tmp_path), **args)
    forward = first.engine.core.executor.driver_worker.runner._forward
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def tokens(llm):
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    def alone(llm):  # a prefill, then one-token steps (the function made for them at start-up)
        return llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids

    try:
        assert forward.trusted  # the multi-token graph ran at start-up
        served = [tokens(first), tokens(second), tokens(first), tokens(second)]
        alone_served = [alone(first), alone(second)]
        second.shutdown()
        assert not forward.trusted
        served.append(tokens(first))  # multi-token steps only (two requests decode together)
        assert forward.trusted  # that graph compiled and checked again
        alone_served.append(alone(first))
        torch._dynamo.reset()  # by any code in the process
        assert not forward.trusted
        alone_served.append(alone(first))
        assert forward.trusted  # its prefill compiled and checked the multi-token graph again
        served.append(tokens(first))
    finally:
        first.shutdown()
        second.shutdown()
    mine = [_hf_greedy(hf_model, p, 4) for p in PROMPTS]
    theirs = [_hf_greedy(other_model, p, 4) for p in PROMPTS]
    assert mine != theirs
    assert served == [mine, theirs, mine, theirs, mine, mine]
    assert alone_served == [mine[0], theirs[0], mine[0], mine[0]]


def test_one_token_steps_pass_the_guards_they_skip(tiny_llama):
    """One-token steps call dynamo's code for them without its guards: every served step's inputs
    pass those guards all the same (as the warm-up's did when the graph was compiled), and the
    tokens are HF's."""
    folder, hf_model = tiny_llama
    llm = LLM(folder, dtype="float32", cpu_compile=True, block_size=4, max_model_len=64, kv_cache_memory=4 << 20)
    forward = llm.engine.core.executor.driver_worker.runner._forward
    direct = forward._one_token
    assert direct is not None
    # It holds its own graph and no other (the multi-token one is in the module's globals too).
    assert len([name for name in direct.__globals__ if name.startswith("__compiled_fn")]) == 1
    entry = next(e for e in forward._cache_entries() if e.code is direct.__code__)
    checks = []

    def checked(model, input_ids, positions, kv_caches, meta):
        f_locals = {"self": model, "input_ids": input_ids, "positions": positions, "kv_caches": kv_caches,
                    "meta": meta}
        checks.append(entry.guard_manager.check(f_locals))
        return direct(model, input_ids, positions, kv_caches, meta)

    forward._one_token = checked
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        out = llm.generate(PROMPTS[1:], params, use_tqdm=False)[0].outputs[0].token_ids
        # A multi-token step's inputs do not pass them (the guards are not vacuous).
        multi = torch.zeros(2, dtype=torch.long)
        assert not entry.guard_manager.check({"self": llm.engine.core.executor.driver_worker.runner.model,
                                              "input_ids": multi, "positions": multi,
                                              "kv_caches": [], "meta": None})
    finally:
        llm.shutdown()
    assert len(checks) == 11 and all(checks)
    assert out == _hf_greedy(hf_model, PROMPTS[1], 12)


def test_cpu_compile_refused_where_it_cannot_apply():
    from tokenmill.config import EngineArgs

    with pytest.raises(ValueError, match="cpu_compile"):
        EngineArgs(cpu_compile=True, tensor_parallel_size=2, device="cpu").create_engine_config()
    with pytest.raises(ValueError, match="cpu_compile"):
        EngineArgs(cpu_compile=True, attention_backend="torch_native", device="cpu").create_engine_config()
    with pytest.raises(ValueError, match="enforce_eager"):
        EngineArgs(cpu_compile=True, enforce_eager=True, device="cpu").create_engine_config()
