"""Sliding-window models against HF transformers on tiny random configs (float32, CPU).

Mistral windows every layer; Qwen2 windows the layers from `max_window_layers` on; Qwen3 takes an
explicit `layer_types`. Windows (5-7 tokens) are not multiples of the block size (4) and prompts
(up to 45 tokens) are several windows long. Greedy tokens must equal HF's and log-probabilities
agree within 2e-4, in one batch, under chunked prefill, under preemption and with prefix-cache
hits (for Mistral, whose every layer slides, also with blocks freed behind the window).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from tokenmill import LLM, SamplingParams

COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.2, rms_norm_eps=1e-6, tie_word_embeddings=False)
CONFIGS = {
    "mistral": dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=7),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True,
                  sliding_window=5, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], head_dim=32, use_sliding_window=True,
                  sliding_window=6, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}
PROMPTS = [[(7 * i + 3) % 160 for i in range(37)], [(11 * i + 1) % 160 for i in range(45)],
           [(5 * i + 2) % 160 for i in range(11)]]
NEW_TOKENS = 12
TOL = 2e-4


def _hf_folder(name: str, tmp_path_factory, **overrides) -> tuple[str, torch.nn.Module]:
    values = {**COMMON, **CONFIGS[name], **overrides}
    model_type = values.pop("model_type")
    config = AutoConfig.for_model(model_type, **values)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    return str(folder), model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def windowed(request, tmp_path_factory):
    folder, model = _hf_folder(request.param, tmp_path_factory)
    return request.param, folder, model


def _hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """HF's greedy continuation (full forward each token) and its log-probs at every position."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return ids[len(prompt):], logprobs


def test_window_changes_the_tokens(windowed, tmp_path_factory):
    """The window matters for these prompts: HF without it generates other tokens (what tokenmill
    produced before it implemented windows)."""
    name, folder, model = windowed
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.sliding_window = None
    if name != "mistral":
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(model.state_dict())
    assert any(_hf_greedy(model, p, NEW_TOKENS)[0] != _hf_greedy(plain, p, NEW_TOKENS)[0] for p in PROMPTS)


SETTINGS = {
    "batch": dict(),
    "chunked": dict(max_num_batched_tokens=8),
    "preempted": dict(num_gpu_blocks_override=22, max_num_batched_tokens=16),
    "prefix-cache": dict(enable_prefix_caching=True, max_num_batched_tokens=16),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_matches_hf(windowed, setting):
    name, folder, model = windowed
    kwargs = dict(dtype="float32", block_size=4, enable_prefix_caching=False)
    kwargs.update(SETTINGS[setting])
    if setting == "preempted" and name == "mistral":
        kwargs["num_gpu_blocks_override"] = 8  # it frees blocks behind the window: a smaller pool
    llm = LLM(folder, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=3, ignore_eos=True)
    refs = [_hf_greedy(model, p, NEW_TOKENS) for p in PROMPTS]
    rounds = 2 if setting == "prefix-cache" else 1  # the second round hits the first one's blocks
    for _ in range(rounds):
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        for prompt, out, (tokens, ref) in zip(PROMPTS, outs, refs):
            assert out.outputs[0].token_ids == tokens, (name, setting)
            for j, position in enumerate(out.outputs[0].logprobs):
                row = ref[len(prompt) - 1 + j]
                for token_id, lp in position.items():
                    assert abs(lp.logprob - float(row[token_id])) < TOL, (name, setting, j)
    core = llm.engine.core
    if setting == "preempted":
        assert core.scheduler.num_preemptions > 0
    if setting == "prefix-cache":
        assert core.kv_manager.prefix_hits > 0
    core.kv_manager.pool.check_invariants()
    assert all(b.ref_cnt == 0 for b in core.kv_manager.pool.blocks)


def test_prompt_logprobs_match_hf(windowed):
    """Every prompt position's log-probability, through chunks that cross the window's edge."""
    name, folder, model = windowed
    llm = LLM(folder, dtype="float32", block_size=4, enable_prefix_caching=False, max_num_batched_tokens=8)
    prompt = PROMPTS[1]
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for i in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < TOL, (name, i)


def test_blocks_behind_the_window_are_freed(tmp_path_factory):
    """Mistral (every layer slides, window 7, blocks of 4): a 150-token generation never holds
    more than the blocks its window reaches, and its tokens still match HF's."""
    folder, model = _hf_folder("mistral", tmp_path_factory)
    llm = LLM(folder, dtype="float32", block_size=4, enable_prefix_caching=False)
    engine = llm.engine
    prompt = PROMPTS[0]
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=150, ignore_eos=True))
    kv = engine.core.kv_manager
    most = 0
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = out.outputs[0].token_ids
        request = engine.core.scheduler.requests.get("r")
        if request is not None and request.num_computed_tokens > len(prompt):  # decoding
            most = max(most, kv.num_held_blocks("r"))
    # The window's 6 earlier keys span at most 3 blocks, plus the block the new token fills
    # (the prompt's step held all 10 of its blocks until the first decode step freed them).
    assert most <= 4
    assert tokens == _hf_greedy(model, prompt, 150)[0]


@pytest.mark.parametrize("field,value", [
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
    ("hidden_act", "gelu"),
    ("layer_types", ["sliding_attention", "full_attention", "chunked_attention"]),
])
def test_unsupported_fields_are_refused(tmp_path_factory, field, value):
    folder, _ = _hf_folder("qwen3", tmp_path_factory, **{field: value})
    with pytest.raises(ValueError, match=field.split("_")[0]):
        LLM(folder, dtype="float32")


def test_a_pool_for_the_window_is_enough(tmp_path_factory, monkeypatch):
    """A pool sized from memory that holds 100 tokens starts a windowed model of max_model_len 512
    (a request holds its window and one chunk) and generates past the pool's size; the same pool
    refuses the model without its window."""
    from tokenmill.worker import worker

    folder, model = _hf_folder("mistral", tmp_path_factory)
    per_token = 3 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head_dim x float32
    monkeypatch.setattr(worker, "default_cpu_kv_cache_bytes", lambda *args: (100 * per_token, "100 tokens"))
    engine = dict(dtype="float32", block_size=4, enable_prefix_caching=False, max_num_batched_tokens=16)
    with LLM(folder, **engine) as llm:
        out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=80, ignore_eos=True),
                           use_tqdm=False)[0]
    assert out.outputs[0].token_ids == _hf_greedy(model, PROMPTS[1], 80)[0]
    plain, _ = _hf_folder("mistral", tmp_path_factory, sliding_window=None)
    with pytest.raises(ValueError, match="max_model_len 512"):
        LLM(plain, **engine)
