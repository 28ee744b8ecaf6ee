"""Tiny random HF models at real head layouts, saved as safetensors folders for the GPU tests."""

from __future__ import annotations

import contextlib

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

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


def hf_folder(tmp_path_factory, name: str, initializer_range: float,
              device: str = "cuda") -> tuple[str, torch.nn.Module]:
    values = dict(SHAPES[name])
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return str(folder), model.to(device).eval()


@contextlib.contextmanager
def hf_with_fp8_kv(model: torch.nn.Module):
    """HF Llama whose attention sees K (after RoPE) and V rounded through the fp8 KV-cache format
    (`kv_quant.quantize_fp8`, unit scale), as tokenmill stores them: the reference an fp8 engine
    should follow. (Against plain bf16 HF even the reference backend is far off on peaky random
    weights: ~4.6 nats per token on the test below, CPU.)"""
    from transformers.models.llama import modeling_llama

    from tokenmill.ops.kv_quant import quantize_fp8

    real_rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_round(q, k, *args, **kwargs):
        q, k = real_rope(q, k, *args, **kwargs)
        return q, quantize_fp8(k, 1.0).to(k.dtype)

    hooks = [layer.self_attn.v_proj.register_forward_hook(lambda m, i, out: quantize_fp8(out, 1.0).to(out.dtype))
             for layer in model.model.layers]
    modeling_llama.apply_rotary_pos_emb = rope_then_round
    try:
        yield model
    finally:
        modeling_llama.apply_rotary_pos_emb = real_rope
        for hook in hooks:
            hook.remove()


def fp8_logprob_gaps(folder: str, hf: torch.nn.Module, device: str, **engine_args) -> list[float]:
    """|logprob the fp8-cache engine gave each of its greedy tokens - what fp8-rounded HF gives it|,
    over a chunked 300-token prefill (cached prefix read back) and two short prompts, 24 tokens each."""
    prompts = [[(11 * i + 5 * j) % 2048 for i in range(n)] for j, n in enumerate((300, 40, 7))]
    params = SamplingParams(temperature=0, max_tokens=24, logprobs=1, ignore_eos=True)
    with LLM(folder, dtype="bfloat16", max_model_len=1024, kv_cache_dtype="fp8", max_num_batched_tokens=128,
             enable_prefix_caching=False, device=device, **engine_args) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    gaps = []
    with hf_with_fp8_kv(hf), torch.no_grad():
        for prompt, out in zip(prompts, outs):
            generated = out.outputs[0].token_ids
            ref = torch.log_softmax(hf(torch.tensor([prompt + generated], device=device)).logits[0].float(), -1)
            for j, token in enumerate(generated):
                gaps.append(abs(out.outputs[0].logprobs[j][token].logprob - ref[len(prompt) - 1 + j, token].item()))
    return gaps


# Prompts of several lengths (a long prefill, short ones, a one-token prompt), token ids < 2048.
LOGIT_PROMPTS = [[(13 * i + 7 * j) % 2048 for i in range(n)] for j, n in enumerate((700, 33, 129, 1))]
LOGIT_PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=20, ignore_eos=True)


def assert_logprobs_match_hf(hf: torch.nn.Module, prompts: list[list[int]], outs, label) -> None:
    """Each generated position's top-20 logprobs against HF's on prompt + generated tokens
    (relative error of the vector at bf16 tolerance)."""
    errors = logprob_errors(hf, prompts, outs)
    worst = max(range(len(errors)), key=errors.__getitem__)
    assert errors[worst] < 2e-2, (label, worst, errors[worst])


def logprob_errors(hf, prompts, outs) -> list[float]:
    """Per generated position: relative error of the top-20 logprob vector against HF's."""
    errors = []
    for prompt, out in zip(prompts, outs):
        tokens = prompt + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([tokens], device="cuda")).logits[0].float(), -1)
        for j, position in enumerate(out.outputs[0].logprobs):
            ids = list(position)
            ours = torch.tensor([position[t].logprob for t in ids])
            theirs = ref[len(prompt) - 1 + j][ids].cpu()
            errors.append(float((ours - theirs).norm() / theirs.norm()))
    return errors


def greedy_eager_and_graphs(folder: str, **engine_args) -> list[list[list[int]]]:
    """Greedy tokens of the same prompts from an eager engine, one with CUDA graphs, and one with
    CUDA graphs and async scheduling (the default on CUDA); the first two step synchronously."""
    prompts = [[(11 * i + 5 * j) % 2048 for i in range(n)] for j, n in enumerate((300, 17, 64, 5, 900))]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = {}
    # The default configuration first: under tensor parallelism only a process's first engine
    # gets the symmetric-memory all-reduces (distributed/symm_mem.create_communicator).
    for eager, async_scheduling in ((False, True), (True, False), (False, False)):
        with LLM(folder, max_model_len=2048, gpu_memory_utilization=0.3, enforce_eager=eager, max_num_seqs=8,
                 async_scheduling=async_scheduling, **engine_args) as llm:
            assert (llm.engine.core.executor.driver_worker.graphs is None) == eager
            outs = llm.generate(prompts, params, use_tqdm=False)
            results[eager, async_scheduling] = [o.outputs[0].token_ids for o in outs]
        torch.cuda.empty_cache()
    return [results[True, False], results[False, False], results[False, True]]


def assert_batch1_graphs_fuse_the_router(folder: str, monkeypatch) -> None:
    """One request of an MoE model, in batch-1 decode graphs: with the router's product inside the
    routing kernel (`moe_routing.route_from_hidden`, which the graphs must really capture) the
    greedy tokens are those of graphs that run the router's GEMV and then `route`. (Against eager
    steps the comparison would also weigh every other layer's GEMV against cuBLAS: in an MoE model
    one rounding difference can flip a near-tied expert.)"""
    from tokenmill.model.layers.moe.fused_moe import FusedMoE
    from tokenmill.ops import moe_routing
    calls = []
    original = moe_routing.route_from_hidden

    def counting(*args, **kwargs):
        calls.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(moe_routing, "route_from_hidden", counting)
    prompt = [[(7 * i + 3) % 2048 for i in range(200)]]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = {}
    for fused in (True, False):
        calls.clear()
        if not fused:
            monkeypatch.setattr(FusedMoE, "_router_fuses", lambda self, hidden: False)
        with LLM(folder, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=4) as llm:
            tokens[fused] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert bool(calls) == fused, f"fused={fused}: {len(calls)} fused router launches"
        torch.cuda.empty_cache()
    assert tokens[True] == tokens[False]


def assert_batch1_graphs_fuse_the_norms(folder: str, monkeypatch, moe: bool) -> None:
    """One request in batch-1 decode graphs: with each decoder layer's norms inside the GEMV after
    them (`gemv.rms_norm_gemv`) and, in an MoE model, inside the fused router
    (`moe_routing.rms_norm_route_from_hidden`), the greedy tokens are those of graphs that run
    each norm's own kernel (both bit-identical, so even a near-tied expert cannot flip), and the
    graphs really captured the fused kernels."""
    from tokenmill.model.layers.layernorm import RMSNorm
    from tokenmill.model.layers.moe.fused_moe import FusedMoE
    from tokenmill.ops import gemv, moe_routing
    calls = {"gemv": 0, "router": 0}
    originals = {"gemv": gemv.rms_norm_gemv, "router": moe_routing.rms_norm_route_from_hidden}

    def counting(kind):
        def call(*args, **kwargs):
            calls[kind] += 1
            return originals[kind](*args, **kwargs)
        return call

    monkeypatch.setattr(gemv, "rms_norm_gemv", counting("gemv"))
    monkeypatch.setattr(moe_routing, "rms_norm_route_from_hidden", counting("router"))
    prompt = [[(5 * i + 1) % 2048 for i in range(150)]]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    tokens = {}
    for fused in (True, False):
        calls.update(gemv=0, router=0)
        if not fused:
            monkeypatch.setattr(RMSNorm, "fuses_into", lambda self, linear, x: False)
            monkeypatch.setattr(FusedMoE, "_norm_fuses", lambda self, norm, hidden: False)
        with LLM(folder, dtype="bfloat16", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=4) as llm:
            tokens[fused] = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        assert (calls["gemv"] > 0) == fused, f"fused={fused}: {calls}"
        assert (calls["router"] > 0) == (fused and moe), f"fused={fused}: {calls}"
        torch.cuda.empty_cache()
    assert tokens[True] == tokens[False]
