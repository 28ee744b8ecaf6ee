"""RL rollouts (docs/rl.md) on the model families beyond the Llama family, on the CPU:

- in-place weight updates of a mixture-of-experts model (Qwen3-MoE: stacked experts), a latent-
  attention one (DeepSeek-V3: MLA and MoE) and a block-FP8 DeepSeek-V3 (e4m3 weights and their
  `weight_scale_inv` block scales, the dequantised `kv_b_proj` that MLA absorbs), from disk and
  from tensors, go through the loader's own name mapping and give exactly what a fresh engine on
  the new weights gives, with no prefix-cache hit from the old ones;
- sleep drops every cache layer (KV blocks, MLA latent rows, MiniMax's linear-attention state
  slots and their prefix-cache checkpoints) and waking rebuilds them: identical outputs, and a
  level-2 sleep followed by an update equals a fresh engine on the update;
- the compiled CPU forward (`cpu_compile`, weights frozen into the graph) is compiled again after
  an update and dropped while asleep;
- weights transformed at load (online fp8, GGUF blocks) survive a sleep round trip; updates into
  them are refused with the reason.
"""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from fp8_checkpoints import save_block_fp8
from test_minimax import CONFIG as MINIMAX_CONFIG
from test_mla_models import COMMON as MLA_COMMON
from test_mla_models import CONFIGS as MLA_CONFIGS
from test_moe_models import COMMON as MOE_COMMON
from test_moe_models import CONFIGS as MOE_CONFIGS
from tokenmill import LLM, SamplingParams

PROMPTS = [[(7 * i + 3 + j) % 160 for i in range(21 + 9 * j)] for j in range(3)]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=6, ignore_eos=True)
ENGINE = dict(dtype="float32", block_size=4, kv_cache_memory=16 << 20)

FAMILIES = {
    "qwen3_moe": ({**MOE_COMMON, **MOE_CONFIGS["qwen3_moe"]}, None),
    "deepseek_v3": ({**MLA_COMMON, **MLA_CONFIGS["v3"]}, None),
    # 32x32 blocks: the tiny model's projections span several, some ending in a partial one.
    "deepseek_v3_fp8": ({**MLA_COMMON, **MLA_CONFIGS["v3"]}, dict(block=(32, 32), skip=("mlp.gate",))),
    "minimax": ({**MINIMAX_CONFIG, "model_type": "minimax"}, None),
}


def _save(name: str, seed: int, folder: str) -> str:
    values, fp8 = FAMILIES[name]
    values = dict(values)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # HF starts the correction bias at 0: make it choose
        for buffer_name, buffer in model.named_buffers():
            if buffer_name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    if fp8 is None:
        model.save_pretrained(folder)
    else:
        save_block_fp8(model, folder, **fp8)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (A, B): two checkpoints of the family (different seeds), built on first use."""
    cache = {}

    def get(name: str) -> tuple[str, str]:
        if name not in cache:
            root = tmp_path_factory.mktemp(name)
            cache[name] = tuple(_save(name, seed, str(root / tag)) for seed, tag in ((0, "A"), (1, "B")))
        return cache[name]
    return get


def _outputs(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False) + llm.generate(PROMPTS[:1], SEEDED, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _cached(llm: LLM) -> list[int]:
    return [o.num_cached_tokens for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def _fresh(folder: str, **extra) -> list[list[int]]:
    with LLM(folder, **ENGINE, **extra) as llm:
        return _outputs(llm)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(folder, file)))
    return tensors


def _derived_addresses(llm: LLM) -> list[int]:
    model = llm.engine.core.executor.driver_worker.model
    return [m._w_kv_b.data_ptr() for m in model.modules() if getattr(m, "_w_kv_b", None) is not None]


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "deepseek_v3_fp8"])
def test_updates_equal_a_fresh_engine(checkpoints, name):
    a, b = checkpoints(name)
    expected_a, expected_b = _fresh(a), _fresh(b)
    assert expected_a != expected_b
    with LLM(a, **ENGINE) as llm:
        assert _outputs(llm) == expected_a
        assert all(n > 0 for n in _cached(llm))
        derived = _derived_addresses(llm)
        assert llm.update_weights_from_disk(b) > 0
        assert _cached(llm) == [0] * len(PROMPTS)  # no block of A's K/V reused
        assert _outputs(llm) == expected_b
        # Derived tensors (the fp8 kv_b_proj dequantised for MLA's absorbed products) are refilled
        # where they were: on a GPU the decode graphs read them, and this update moved no parameter.
        assert _derived_addresses(llm) == derived
        # Back to A from tensors, the routed experts' per-expert matrices (and their block scales)
        # in one call and everything else in another: any subset loads.
        tensors = _tensors(a)
        experts = {k: v for k, v in tensors.items() if ".experts." in k}
        assert experts
        llm.update_weights_from_tensors(experts)
        llm.update_weights_from_tensors({k: v for k, v in tensors.items() if k not in experts})
        assert _outputs(llm) == expected_a


def _cache_tensors(llm: LLM) -> list[torch.Tensor]:
    """Every tensor of the runner's cache layers (K/V pairs, latent rows, state pools)."""
    caches = llm.engine.core.executor.driver_worker.runner.kv_caches
    flat = []
    for cache in caches:
        flat += list(cache) if isinstance(cache, (tuple, list)) else [cache]
    return flat


@pytest.mark.parametrize("name", ["deepseek_v3_fp8", "minimax"])
def test_sleep_drops_every_cache_layer_and_waking_rebuilds_them(checkpoints, name):
    a, b = checkpoints(name)
    # MiniMax: prefix caching with a state checkpoint every 16 tokens, so A's checkpoints exist.
    extra = dict(state_checkpoint_interval=16) if name == "minimax" else {}
    expected_b = _fresh(b, **extra)
    with LLM(a, enable_sleep_mode=True, **ENGINE, **extra) as llm:
        runner = llm.engine.core.executor.driver_worker.runner
        kinds = {type(layer).__name__ for layer in runner.attention_layers}
        assert kinds == ({"Attention", "LightningAttention"} if name == "minimax" else {"MLAAttention"})
        before = _outputs(llm)
        assert all(n > 0 for n in _cached(llm))
        if name == "minimax":
            assert llm.engine.core.kv_manager.states.pool.cached  # A's state checkpoints
        cache_refs = [weakref.ref(t) for t in _cache_tensors(llm)]
        mla = [m for m in runner.model.modules() if type(m).__name__ == "MLAAttention"]
        assert all(m._w_kv_b is not None for m in mla)  # the fp8 kv_b_proj, dequantised
        llm.sleep(level=1)
        gc.collect()
        assert runner.kv_caches == [] and all(ref() is None for ref in cache_refs)
        assert all(m._w_kv_b is None for m in mla)
        llm.wake_up()
        assert len(_cache_tensors(llm)) == len(cache_refs)
        assert _cached(llm) == [0] * len(PROMPTS)  # the cache's contents went with it
        assert _outputs(llm) == before
        # Level 2: the weights are dropped; wake them alone, push B, then the caches.
        llm.sleep(level=2)
        llm.wake_up(tags=["weights"])
        llm.update_weights_from_disk(b)
        llm.wake_up(tags=["kv_cache"])
        assert _outputs(llm) == expected_b


def _hf_greedy(folder: str, prompt: list[int], n: int) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_compiled_cpu_forward_follows_updates_and_sleep(tmp_path):
    from rl_models import make_checkpoints

    ckpt = make_checkpoints(str(tmp_path))
    prompt = PROMPTS[1]
    expected_a, expected_b = _hf_greedy(ckpt.a, prompt, 6), _hf_greedy(ckpt.b, prompt, 6)
    assert expected_a != expected_b
    with LLM(ckpt.a, cpu_compile=True, enable_sleep_mode=True, max_model_len=128, **ENGINE) as llm:
        runner = llm.engine.core.executor.driver_worker.runner

        def greedy() -> list[int]:
            return llm.generate([prompt], GREEDY, use_tqdm=False)[0].outputs[0].token_ids

        assert type(runner._forward).__name__ == "CompiledCpuForward"
        assert greedy() == expected_a
        llm.update_weights_from_disk(ckpt.b)  # frozen into the graph: compiled again
        assert greedy() == expected_b
        llm.sleep(level=1)
        assert runner._forward is runner.model  # the graph and its copy of the weights are gone
        llm.wake_up()
        assert type(runner._forward).__name__ == "CompiledCpuForward"
        assert greedy() == expected_b


def test_weights_transformed_at_load_sleep_and_refuse_updates(tmp_path):
    """Online fp8 and GGUF blocks kept quantised: a level-1 sleep round trip gives identical
    outputs (waking does not transform the restored weights again), and an update, which could not
    be copied into the transformed parameters, is refused with the reason."""
    from rl_models import make_checkpoints

    ckpt = make_checkpoints(str(tmp_path))
    engines = [((ckpt.a,), dict(quantization="fp8", **ENGINE), "quantization='fp8' applied at load"),
               ((), dict(quantization="gguf", max_model_len=64, kv_cache_memory=8 << 20), "quantization='gguf'")]
    for args, kwargs, refusal in engines:  # (no model: the embedded GGUF)
        with LLM(*args, enable_sleep_mode=True, **kwargs) as llm:
            before = _outputs(llm)
            llm.sleep(level=1)
            llm.wake_up()
            assert _outputs(llm) == before
            with pytest.raises(ValueError, match=refusal):
                llm.update_weights_from_tensors({"lm_head.weight": torch.zeros(1)})
            assert _outputs(llm) == before


@pytest.mark.slow
def test_tensor_parallel_update_of_mla_moe(checkpoints):
    """Two gloo ranks: each takes its shard of the experts and the latent projections through the
    same loaders."""
    a, b = checkpoints("deepseek_v3")
    tp = dict(tensor_parallel_size=2)
    expected_b = _fresh(b, **tp)
    with LLM(a, **ENGINE, **tp) as llm:
        llm.update_weights_from_disk(b)
        assert _outputs(llm) == expected_b
