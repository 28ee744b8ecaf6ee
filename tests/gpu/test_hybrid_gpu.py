"""Sliding windows and the MiniMax hybrid on the GPU (Triton kernels, CUDA graphs) against HF
transformers on the same random weights. Skipped without CUDA.

Real head layouts (head_dim 128), prompts several windows long, windows not multiples of the
block size. MiniMax's reference is HF in float32 (HF keeps the linear state in the model dtype,
so its bfloat16 run drifts from the exact recurrence faster than tokenmill's float32 state).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_models import (  # noqa: E402
    LOGIT_PARAMS,
    LOGIT_PROMPTS,
    assert_logprobs_match_hf,
    greedy_eager_and_graphs,
    logprob_errors,
)
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

BASE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False)
SHAPES = {
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=100),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                  sliding_window=77, max_window_layers=2),
    "minimax": dict(model_type="minimax", architectures=["MiniMaxForCausalLM"], num_local_experts=8,
                    num_experts_per_tok=2, intermediate_size=256, rotary_dim=64, block_size=256,
                    layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"],
                    full_attn_alpha_factor=1.5, linear_attn_alpha_factor=1.5, mlp_alpha_factor=1.5),
}


def folder_and_reference(tmp_path_factory, name: str, initializer_range: float, monkeypatch):
    values = {**BASE, **SHAPES[name]}
    config = AutoConfig.for_model(values.pop("model_type"), initializer_range=initializer_range, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    if name == "minimax":
        model = model.float()
        _float32_decays(model)
        _patch_partial_rotary(model, 64, monkeypatch)
    return str(folder), model.cuda().eval()


def _float32_decays(model) -> None:
    """HF builds MiniMax's lightning decay buffers (slope rates, block decays) in the dtype the model
    is created in and `.float()` keeps them bf16-rounded; tokenmill computes them in float32. With
    the rounded slopes HF's float32 tokens drift from the exact recurrence (seen: a 700-token prompt's
    sixth token on an H100, and on CPU logprobs 0.5 nats apart); recomputed, they agree to 1e-3."""
    for layer in model.model.layers:
        attention = layer.self_attn
        if hasattr(attention, "slope_rate"):
            slope = attention.get_slope_rate().float()
            for name, value in zip(("slope_rate", "query_decay", "key_decay", "diagonal_decay"),
                                   (slope, *attention.decay_factors(slope))):
                setattr(attention, name, torch.nn.Buffer(value.float()))


def _patch_partial_rotary(model, rotary_dim: int, monkeypatch) -> None:
    """HF's MiniMax rotates whole heads; the checkpoints (and tokenmill) rotate `rotary_dim` dims."""
    from transformers.models.minimax import modeling_minimax
    theta = model.config.rope_parameters["rope_theta"]
    model.model.rotary_emb.inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    full = modeling_minimax.apply_rotary_pos_emb

    def partial(q, k, cos, sin, unsqueeze_dim=1):
        qr, kr = full(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, unsqueeze_dim)
        return torch.cat([qr, q[..., rotary_dim:]], -1), torch.cat([kr, k[..., rotary_dim:]], -1)

    monkeypatch.setattr(modeling_minimax, "apply_rotary_pos_emb", partial)


@pytest.mark.parametrize("name,chunk", [("mistral", None), ("mistral", 96), ("qwen2", None), ("minimax", None),
                                        ("minimax", 96)])
def test_logits_match_hf_bf16(name, chunk, tmp_path_factory, monkeypatch):
    folder, hf = folder_and_reference(tmp_path_factory, name, 0.05, monkeypatch)
    kwargs = dict(max_num_batched_tokens=chunk) if chunk else {}
    with LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, block_size=16,
             max_num_seqs=8, **kwargs) as llm:
        outs = llm.generate(LOGIT_PROMPTS, LOGIT_PARAMS, use_tqdm=False)
    if name != "minimax":
        assert_logprobs_match_hf(hf, LOGIT_PROMPTS, outs, f"{name} chunk={chunk}")
        return
    # MiniMax routes to experts: as the MoE families (test_moe_gpu), close on average, and a
    # position may be further off where bf16 rounding moved a router score across the k-th one.
    # Its float32 run below must match HF's tokens exactly.
    errors = logprob_errors(hf, LOGIT_PROMPTS, outs)
    assert sum(errors) / len(errors) < 1e-2 and max(errors) < 0.12, (chunk, [round(e, 4) for e in errors])


def test_minimax_float32_greedy_matches_hf(tmp_path_factory, monkeypatch):
    """Float32 through the lightning kernels, the state slots and the fused MoE (IEEE products):
    HF's greedy tokens exactly, over prompts that cross lightning blocks, in one batch."""
    folder, hf = folder_and_reference(tmp_path_factory, "minimax", 0.2, monkeypatch)
    prompts = [[(13 * i + 7 * j) % 2048 for i in range(n)] for j, n in enumerate((700, 300, 40, 1))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    with LLM(folder, dtype="float32", max_model_len=1024, gpu_memory_utilization=0.3, max_num_seqs=8) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        generated = out.outputs[0].token_ids
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + generated], device="cuda")).logits[0].float()
        assert generated == logits[len(prompt) - 1:-1].argmax(-1).tolist(), len(prompt)


@pytest.mark.parametrize("name", ["mistral", "minimax"])
def test_cuda_graphs_match_eager(name, tmp_path_factory, monkeypatch):
    folder, _ = folder_and_reference(tmp_path_factory, name, 0.5, monkeypatch)  # peaky logits: greedy far above rounding
    eager, graphs, graphs_async = greedy_eager_and_graphs(folder, dtype="bfloat16")
    assert eager == graphs == graphs_async


def test_minimax_prefix_cache_hits_match_no_cache(tmp_path_factory, monkeypatch):
    """Requests sharing a 700-token document restore state checkpoints (every 128 tokens) with
    the KV blocks and generate what an engine without a cache generates."""
    folder, _ = folder_and_reference(tmp_path_factory, "minimax", 0.5, monkeypatch)
    doc = [(13 * i + 7) % 2048 for i in range(700)]
    prompts = [doc + [(5 * j + i) % 2048 for i in range(20)] for j in range(4)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    results = []
    for caching in (False, True):
        with LLM(folder, dtype="bfloat16", max_model_len=2048, gpu_memory_utilization=0.3, max_num_seqs=8,
                 enable_prefix_caching=caching, state_checkpoint_interval=128) as llm:
            first = llm.generate(prompts[:1], params, use_tqdm=False)
            rest = llm.generate(prompts[1:], params, use_tqdm=False)
            if caching:
                assert [o.num_cached_tokens for o in rest] == [640] * 3
            results.append([o.outputs[0].token_ids for o in first + rest])
        torch.cuda.empty_cache()
    assert results[0] == results[1]
