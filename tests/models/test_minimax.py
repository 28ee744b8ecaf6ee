"""MiniMax (hybrid lightning + softmax attention, MoE) against HF transformers on tiny random
configs (float32, CPU): greedy tokens equal to HF's, log-probabilities within 2e-4.

The config has three lightning layers and two softmax layers in an irregular order, residual
alpha/beta factors that are not 1, and more experts than a decode step uses. Covered: requests of
different lengths batched, chunked prefill (the state carried across chunks through the slot),
preemption (the state recomputed from scratch, or restored from a checkpoint), prefix caching with
hits (KV blocks and the state checkpoint restored together), tensor parallelism over two ranks, a
sliding window on the softmax layers and partial rotary embedding (`rotary_dim`, which HF's MiniMax
ignores: compared against HF with the original checkpoints' partial rotation patched in).
"""

from __future__ import annotations

import pytest
import torch
from transformers import MiniMaxConfig, AutoModelForCausalLM
from transformers.models.minimax import modeling_minimax

from tokenmill import LLM, SamplingParams

CONFIG = dict(
    architectures=["MiniMaxForCausalLM"], vocab_size=160, hidden_size=64, intermediate_size=48,
    num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=6,
    num_experts_per_tok=2, max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-6,
    tie_word_embeddings=False, block_size=16,
    layer_types=["linear_attention", "linear_attention", "full_attention", "linear_attention", "full_attention"],
    full_attn_alpha_factor=1.3, full_attn_beta_factor=0.8, linear_attn_alpha_factor=1.5,
    linear_attn_beta_factor=0.9, mlp_alpha_factor=1.2, mlp_beta_factor=1.1,
)
DOC = [(7 * i + 3) % 160 for i in range(37)]
PROMPTS = [DOC, [(11 * i + 1) % 160 for i in range(45)], DOC[:11]]
NEW_TOKENS = 10
ENGINE = dict(dtype="float32", block_size=4, enable_prefix_caching=False)
TOL = 2e-4


def _save(folder, **overrides) -> torch.nn.Module:
    config = MiniMaxConfig(**{**CONFIG, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def minimax(tmp_path_factory):
    folder = tmp_path_factory.mktemp("minimax")
    return str(folder), _save(folder)


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return ids[len(prompt):], logprobs


def check(outs, prompts, model, what=""):
    for prompt, out in zip(prompts, outs):
        tokens, ref = hf_greedy(model, prompt, len(out.outputs[0].token_ids))
        assert out.outputs[0].token_ids == tokens, what
        for j, position in enumerate(out.outputs[0].logprobs or []):
            for token_id, lp in position.items():
                assert abs(lp.logprob - float(ref[len(prompt) - 1 + j, token_id])) < TOL, (what, j)


PARAMS = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=3, ignore_eos=True)


@pytest.mark.parametrize("chunk", [None, 8, 5])
def test_matches_hf(minimax, chunk):
    """Batched; chunked prefill in chunks of 8 and of 5 (chunk ends off every scan block)."""
    folder, model = minimax
    kwargs = dict(ENGINE, max_num_batched_tokens=chunk) if chunk else ENGINE
    with LLM(folder, **kwargs) as llm:
        check(llm.generate(PROMPTS, PARAMS, use_tqdm=False), PROMPTS, model, f"chunk={chunk}")
        kv = llm.engine.core.kv_manager
        assert kv.states is not None and not kv.states.working  # every slot returned


def test_prompt_logprobs_match_hf(minimax):
    folder, model = minimax
    prompt = PROMPTS[1]
    with LLM(folder, max_num_batched_tokens=8, **ENGINE) as llm:
        out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    for i in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[i][prompt[i]].logprob - float(ref[i - 1, prompt[i]])) < TOL, i


@pytest.mark.parametrize("caching", [False, True])
def test_preemption(minimax, caching):
    """A 16-block pool that cannot hold all three requests to the end: some are preempted and
    recomputed, from scratch (caching off) or from their own state checkpoints (on)."""
    folder, model = minimax
    kwargs = dict(ENGINE, num_gpu_blocks_override=16, max_num_batched_tokens=16, enable_prefix_caching=caching,
                  state_checkpoint_interval=16)
    with LLM(folder, **kwargs) as llm:
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        core = llm.engine.core
        assert core.scheduler.num_preemptions > 0
        core.kv_manager.pool.check_invariants()
        core.kv_manager.states.pool.check_invariants()
    check(outs, PROMPTS, model, f"caching={caching}")


@pytest.mark.parametrize("chunk", [None, 8])
def test_prefix_cache_restores_state_checkpoints(minimax, chunk):
    """Requests sharing the 37-token document hit its KV blocks only up to the last state
    checkpoint (every 16 tokens), restore that state into their slot and match HF."""
    folder, model = minimax
    kwargs = dict(ENGINE, enable_prefix_caching=True, state_checkpoint_interval=16)
    if chunk:
        kwargs["max_num_batched_tokens"] = chunk
    first = [DOC + [5, 6, 7]]
    later = [DOC + [9, 8], DOC[:33] + [1, 2, 3, 4], DOC + [5, 6, 7]]
    with LLM(folder, **kwargs) as llm:
        check(llm.generate(first, PARAMS, use_tqdm=False), first, model, "first")
        outs = llm.generate(later, PARAMS, use_tqdm=False)
        check(outs, later, model, "hits")
        # The document's checkpoints are at 16 and 32 tokens: every later prompt starts at 32.
        assert [o.num_cached_tokens for o in outs] == [32, 32, 32]
        states = llm.engine.core.kv_manager.states
        assert not states.working
        states.pool.check_invariants()


def test_prefix_cache_without_a_checkpoint_is_not_a_hit(minimax):
    """KV blocks are cached, but the prompt is shorter than the checkpoint interval: no state to
    restore, so no hit (never the blocks without the state)."""
    folder, model = minimax
    with LLM(folder, **{**ENGINE, "enable_prefix_caching": True}, state_checkpoint_interval=64) as llm:
        llm.generate([DOC], PARAMS, use_tqdm=False)
        out = llm.generate([DOC + [4]], PARAMS, use_tqdm=False)
        assert out[0].num_cached_tokens == 0
        assert llm.engine.core.kv_manager.pool.cached  # the blocks themselves are cached
    check(out, [DOC + [4]], model)


@pytest.mark.slow
def test_tensor_parallel_2_ranks(minimax):
    """Lightning heads (and their state slots, decay rates, norm slices) split over two ranks."""
    folder, model = minimax
    with LLM(folder, tensor_parallel_size=2, max_num_batched_tokens=8, **ENGINE) as llm:
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    check(outs, PROMPTS, model, "tp=2")


def test_sliding_window_on_softmax_layers(tmp_path):
    """HF's MiniMax windows its softmax layers when `sliding_window` is set; lightning layers keep
    their whole history in the state."""
    model = _save(tmp_path, sliding_window=7)
    with LLM(str(tmp_path), max_num_batched_tokens=8, **ENGINE) as llm:
        check(llm.generate(PROMPTS, PARAMS, use_tqdm=False), PROMPTS, model, "window")


def _partial_rotary(model, rotary_dim: int, monkeypatch) -> None:
    """Give HF's MiniMax the released checkpoints' partial rotary embedding: frequencies over the
    first `rotary_dim` dims, and only those rotated (neox style)."""
    rope = model.model.rotary_emb
    theta = model.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))
    rope.inv_freq = inv_freq
    original = modeling_minimax.apply_rotary_pos_emb

    def apply_partial(q, k, cos, sin, unsqueeze_dim=1):
        q_rot, k_rot = original(q[..., :rotary_dim], k[..., :rotary_dim], cos, sin, unsqueeze_dim)
        return torch.cat([q_rot, q[..., rotary_dim:]], -1), torch.cat([k_rot, k[..., rotary_dim:]], -1)

    monkeypatch.setattr(modeling_minimax, "apply_rotary_pos_emb", apply_partial)


def test_partial_rotary(tmp_path, monkeypatch):
    model = _save(tmp_path, rotary_dim=8)
    _partial_rotary(model, 8, monkeypatch)
    with LLM(str(tmp_path), **ENGINE) as llm:
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    check(outs, PROMPTS, model, "rotary_dim=8")
    # The patch took effect: HF's own full rotation gives different tokens.
    monkeypatch.undo()
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert any(hf_greedy(plain, p, NEW_TOKENS)[0] != o.outputs[0].token_ids for p, o in zip(PROMPTS, outs))


@pytest.mark.parametrize("field,value", [("postnorm", False), ("shared_intermediate_size", 64),
                                         ("layernorm_mlp_alpha", 3.0), ("hidden_act", "gelu")])
def test_unsupported_fields_are_refused(tmp_path, field, value):
    _save(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=field):
        LLM(str(tmp_path), **ENGINE)
