"""Mixture-of-experts families against HF transformers on tiny random configs (float32): greedy
tokens equal to HF's argmax and log-probabilities within tolerance, with two requests batched,
under chunked prefill, under preemption, and split over two ranks (gloo).

Each config has more experts than a decode step has (token, expert) pairs, and between them they
use renormalisation on and off, a sigmoid-gated shared expert (Qwen2-MoE), a dense layer among
sparse ones (`mlp_only_layers`), a correction bias that changes the choice (MiniMax-M2, set to
random values: HF initialises it to zeros) and partial rotary embedding (MiniMax-M2).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

COMMON = dict(vocab_size=160, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False)
CONFIGS = {
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], head_dim=32,
                      num_experts=16, num_experts_per_tok=4, moe_intermediate_size=32, intermediate_size=96,
                      norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen2_moe": dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], num_experts=16,
                      num_experts_per_tok=4, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                      intermediate_size=96, norm_topk_prob=False),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], num_local_experts=8,
                    num_experts_per_tok=2, intermediate_size=48),
    "minimax_m2": dict(model_type="minimax_m2", architectures=["MiniMaxM2ForCausalLM"], head_dim=32, rotary_dim=16,
                       num_local_experts=16, num_experts_per_tok=4, intermediate_size=32,
                       scoring_func="sigmoid", use_routing_bias=True, use_qk_norm=True, qk_norm_type="per_layer"),
}
PROMPT = [(7 * i + 3) % 160 for i in range(37)]
SHORT = PROMPT[:11]
NEW_TOKENS = 6
ENGINE = dict(dtype="float32", block_size=4, enable_prefix_caching=False)


def _hf_model(name: str):
    values = dict(COMMON, **CONFIGS[name])
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for module_name, buffer in model.named_buffers():
            if module_name.endswith("e_score_correction_bias"):
                buffer.normal_(0, 0.1)  # large enough to change which experts are chosen
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny_moe(request, tmp_path_factory):
    model = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return request.param, str(folder), model


def _check_against_hf(name, hf_model, out, prompt):
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompt + generated])).logits[0].float(), dim=-1)
    assert generated == ref[len(prompt) - 1:-1].argmax(-1).tolist(), name
    if out.prompt_logprobs is not None:
        for i in range(1, len(prompt)):
            assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 2e-4, (name, i)
    for j, position in enumerate(out.outputs[0].logprobs):
        top = ref[len(prompt) - 1 + j].topk(5)
        for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(position[token_id].logprob - value) < 2e-4, (name, j)


PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, prompt_logprobs=5, ignore_eos=True)


@pytest.mark.parametrize("chunk", [None, 8])
def test_moe_logprobs_match_hf(tiny_moe, chunk):
    name, folder, hf_model = tiny_moe
    kwargs = dict(ENGINE, max_num_batched_tokens=chunk) if chunk else ENGINE
    with LLM(folder, **kwargs) as llm:
        outs = llm.generate([PROMPT, SHORT], PARAMS, use_tqdm=False)
    for out, prompt in zip(outs, [PROMPT, SHORT]):
        _check_against_hf(name, hf_model, out, prompt)


def test_moe_under_preemption(tiny_moe):
    """Two requests start in a 12-block pool (5 blocks each) that cannot hold both to the end (8
    blocks each): one is preempted and recomputed."""
    name, folder, hf_model = tiny_moe
    prompts = [PROMPT[:20], PROMPT[5:24]]
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=5, ignore_eos=True)
    with LLM(folder, num_gpu_blocks_override=12, **ENGINE) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.core.scheduler.num_preemptions > 0
    for out, prompt in zip(outs, prompts):
        _check_against_hf(name, hf_model, out, prompt)


@pytest.mark.slow
def test_moe_tensor_parallel_2_ranks(tiny_moe):
    """Experts split along their intermediate dimension over two ranks (gloo), shared experts and
    routed experts summed once; MiniMax-M2's q/k norm summed across ranks; chunked prefill."""
    name, folder, hf_model = tiny_moe
    with LLM(folder, tensor_parallel_size=2, max_num_batched_tokens=8, **ENGINE) as llm:
        layer = llm.engine.core.executor.driver_worker.model.model.layers[0]
        experts = next(m for m in layer.modules() if type(m).__name__ == "FusedMoE")
        assert experts.intermediate_per_rank * 2 == hf_model.config.to_dict().get(
            "moe_intermediate_size", hf_model.config.intermediate_size)
        outs = llm.generate([PROMPT, SHORT], PARAMS, use_tqdm=False)
    for out, prompt in zip(outs, [PROMPT, SHORT]):
        _check_against_hf(name, hf_model, out, prompt)


def test_unsupported_fields_are_refused_at_start(tmp_path):
    cases = {
        "mixtral": (dict(sliding_window=16), "sliding_window"),
        "qwen3_moe": (dict(use_sliding_window=True, sliding_window=16), "use_sliding_window"),
        "minimax_m2": (dict(qk_norm_type="per_head"), "qk_norm_type"),
    }
    for name, (override, field) in cases.items():
        values = {**COMMON, **CONFIGS[name], **override, "num_hidden_layers": 1}
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        folder = tmp_path / name
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        with pytest.raises(ValueError, match=field):
            LLM(str(folder), **ENGINE)


def test_weights_from_an_hf_model_in_memory(tiny_moe):
    """HF's in-memory tensors (transformers 5 stacks experts as `experts.gate_up_proj`), renamed to
    checkpoint names, load through the same mapping as a checkpoint: the benchmark baseline's path
    (`benchmarks/hf_baseline.py`) and the one a weight update from tensors takes."""
    from tokenmill.benchmarks.hf_baseline import checkpoint_named_weights
    from tokenmill.model.loader.weights import load_weights

    name, folder, hf_model = tiny_moe
    with LLM(folder, load_format="dummy", **ENGINE) as llm:
        ours = llm.engine.core.executor.driver_worker.model
        assert any(n.endswith("experts.gate_up_proj") for n, _ in hf_model.named_parameters())
        load_weights(ours, checkpoint_named_weights(hf_model))
        for module in ours.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5,
                                                    ignore_eos=True), use_tqdm=False)[0]
    _check_against_hf(name, hf_model, out, PROMPT)


def test_decode_bytes_count_only_the_chosen_experts(tmp_path):
    """The benchmarks' bytes-read floor: of each routed-experts layer, top_k experts per token
    (shared experts and dense layers whole)."""
    from tokenmill.benchmarks.common import weight_bytes_read

    _hf_model("qwen2_moe").save_pretrained(tmp_path)
    with LLM(str(tmp_path), load_format="dummy", **ENGINE) as llm:
        model = llm.engine.core.executor.driver_worker.model
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        embed = model.model.embed_tokens.weight
        moe = [m for m in model.modules() if hasattr(m, "num_local_experts")]
        experts = sum(m.w13_weight.numel() + m.w2_weight.numel() for m in moe) * 4
        k, e = moe[0].routing.top_k, moe[0].num_local_experts
        assert weight_bytes_read(model, 1) == total - embed.numel() * 4 - experts + experts * k // e
        assert weight_bytes_read(model, 1000) == total - embed.numel() * 4  # every expert read
