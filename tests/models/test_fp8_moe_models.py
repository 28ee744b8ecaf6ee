"""Block-FP8 mixture-of-experts and MLA models on the CPU: tiny random Qwen3-MoE, MiniMax-M2 and
DeepSeek-V3 quantised in the test as their FP8 releases are (`fp8_checkpoints.save_block_fp8`:
routed experts, attention and MLA projections in e4m3 with per-block `weight_scale_inv`; routers
kept as each release keeps them), loaded by tokenmill and compared with HF transformers on the
dequantised weights (float32): greedy tokens equal, log-probabilities within 2e-4, also under
chunked prefill; TP=2 (gloo) as one rank.

These models are tiny (hidden size 64), so their weights use 32x32 blocks (the format and the
code take any block size; the dense tests and the kernels' use 128x128): every expert, head and
projection still spans several blocks, and some end in a partial one.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fp8_checkpoints import save_block_fp8
from test_mla_models import COMMON as MLA_COMMON
from test_mla_models import CONFIGS as MLA_CONFIGS
from test_moe_models import COMMON as MOE_COMMON
from test_moe_models import CONFIGS as MOE_CONFIGS
from tokenmill import LLM, SamplingParams

FP8 = torch.float8_e4m3fn
BLOCK = (32, 32)
PROMPT = [(7 * i + 3) % 160 for i in range(37)]
NEW_TOKENS = 6
ENGINE = dict(dtype="float32", block_size=4, enable_prefix_caching=False)

MODELS = {
    # Qwen3-MoE FP8 lists each layer's router (`mlp.gate`) and the LM head as unconverted.
    "qwen3_moe": (MOE_COMMON, dict(MOE_CONFIGS["qwen3_moe"], moe_intermediate_size=64, intermediate_size=128),
                  dict(keep=tuple(f"model.layers.{i}.mlp.gate" for i in range(3)) + ("lm_head",))),
    # MiniMax-M2 lists `gate` (matched as a suffix), the correction bias and the LM head.
    "minimax_m2": (MOE_COMMON, dict(MOE_CONFIGS["minimax_m2"], intermediate_size=64),
                   dict(keep=("gate", "e_score_correction_bias", "lm_head"))),
    # DeepSeek-V3 lists nothing: its router is no linear layer in HF and stays bf16 in the release.
    "deepseek_v3": (MLA_COMMON, MLA_CONFIGS["v3"], dict(skip=("mlp.gate",))),
}


def _hf_model(name: str, **overrides) -> torch.nn.Module:
    common, specific, _ = MODELS[name]
    values = {**common, **specific, **overrides}
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF starts the correction bias at 0: make it choose
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


@pytest.fixture(scope="module", params=sorted(MODELS))
def fp8_moe(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"{request.param}_fp8"))
    reference = save_block_fp8(_hf_model(request.param), folder, BLOCK, **MODELS[request.param][2])
    return request.param, folder, reference


def _check(name, reference, out, prompt):
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        ref = torch.log_softmax(reference(torch.tensor([prompt + generated])).logits[0].float(), dim=-1)
    assert generated == ref[len(prompt) - 1:-1].argmax(-1).tolist(), name
    for i in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < 2e-4, (name, i)
    for j, position in enumerate(out.outputs[0].logprobs):
        top = ref[len(prompt) - 1 + j].topk(5)
        for token_id, value in zip(top.indices.tolist(), top.values.tolist()):
            assert abs(position[token_id].logprob - value) < 2e-4, (name, j)


def _experts(model):
    return next(m for m in model.modules() if type(m).__name__ == "FusedMoE")


PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=5, prompt_logprobs=5, ignore_eos=True)


@pytest.mark.parametrize("chunk", [None, 8])
def test_block_fp8_moe_matches_hf(fp8_moe, chunk):
    name, folder, reference = fp8_moe
    kwargs = dict(ENGINE, max_num_batched_tokens=chunk) if chunk else ENGINE
    with LLM(folder, **kwargs) as llm:
        model = llm.engine.core.executor.driver_worker.model
        experts = _experts(model)
        assert experts.w13_weight.dtype == FP8 and experts.w2_weight_scale_inv.dtype == torch.float32
        assert experts.w13_weight_scale_inv.shape[1:] == (2 * experts.intermediate_per_rank // 32,
                                                          -(-experts.hidden_size // 32))
        if name == "deepseek_v3":
            attn = model.model.layers[0].self_attn
            assert attn.kv_b_proj.weight.dtype == FP8 and attn.q_b_proj.weight.dtype == FP8
            assert attn.mla_attn._w_kv_b is not None  # decode's absorbed products: dequantised once
        else:
            gate = model.model.layers[0].mlp.gate if name == "qwen3_moe" else model.model.layers[0].block_sparse_moe.gate
            assert gate.weight.dtype == torch.float32  # the router stays unquantised
        outs = llm.generate([PROMPT, PROMPT[:11]], PARAMS, use_tqdm=False)
    _check(name, reference, outs[0], PROMPT)
    _check(name, reference, outs[1], PROMPT[:11])


@pytest.mark.slow
def test_block_fp8_moe_tensor_parallel(fp8_moe):
    """TP=2: each rank holds every expert's half of the intermediate size with the scales of its
    blocks; same tokens and log-probabilities as one rank."""
    name, folder, _ = fp8_moe
    if name == "deepseek_v3":
        pytest.skip("q_b_proj's 96 rows per head pair split into 48: not whole 32-blocks")
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=1, ignore_eos=True)
    with LLM(folder, **ENGINE) as llm:
        expected = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    with LLM(folder, tensor_parallel_size=2, **ENGINE) as llm:
        experts = _experts(llm.engine.core.executor.driver_worker.model)
        assert experts.w13_weight.dtype == FP8 and experts.w13_weight.shape[1] == experts.intermediate_per_rank * 2
        got = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == expected.token_ids
    for a, b in zip(got.logprobs, expected.logprobs):
        for token, lp in b.items():
            assert abs(a[token].logprob - lp.logprob) < 1e-4


def test_online_fp8_moe_keeps_the_router(tmp_path):
    """`quantization="fp8"` on an unquantised MoE checkpoint: experts per output channel, router
    (`gate`) in the model dtype; log-probabilities as HF with the same per-channel quantisation."""
    from tokenmill.ops.fp8_format import dequantize_weight_per_channel, quantize_weight_per_channel

    model = _hf_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    with LLM(str(tmp_path), quantization="fp8", **ENGINE) as llm:
        layer = llm.engine.core.executor.driver_worker.model.model.layers[0]
        assert layer.mlp.gate.weight.dtype == torch.float32
        assert layer.mlp.experts.w13_weight.dtype == FP8 and layer.mlp.experts.w13_weight_scale.shape == (16, 128)
        out = llm.generate([PROMPT], PARAMS, use_tqdm=False)[0]
    with torch.no_grad():
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name != "lm_head" and not module_name.endswith("gate"):
                module.weight.copy_(dequantize_weight_per_channel(*quantize_weight_per_channel(module.weight),
                                                                  torch.float32))
        for experts in (m for m in model.modules() if type(m).__name__.endswith("Experts")):
            for param in (experts.gate_up_proj, experts.down_proj):  # HF's stacked [E, N, K] experts
                param.copy_(torch.stack([dequantize_weight_per_channel(*quantize_weight_per_channel(w), torch.float32)
                                         for w in param]))
    _check("online qwen3_moe", model, out, PROMPT)


def test_experts_that_cut_a_block_are_refused(tmp_path):
    """32 intermediate features per expert over 2 ranks: 16 each, half a 32-row block."""
    model = _hf_model("minimax_m2", intermediate_size=32)
    save_block_fp8(model, str(tmp_path), BLOCK, keep=("gate", "e_score_correction_bias", "lm_head"))
    with pytest.raises(Exception, match="whole 32-row blocks"):
        LLM(str(tmp_path), tensor_parallel_size=2, **ENGINE)
