"""RL rollouts on the GPU (docs/rl.md), with CUDA graphs and async scheduling on: sleep returns the
device memory and waking gives identical tokens; in-place updates (tensors, CUDA IPC from a second
process with checkpoint-engine's protocol and with a handle per tensor) equal a fresh engine on the
new weights; batch-invariant mode keeps a request's tokens whatever its batch. Skipped without CUDA."""

from __future__ import annotations

import multiprocessing
import tempfile

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from gpu_models import hf_folder  # noqa: E402
from rl_models import trainer_cuda_ipc  # noqa: E402

from tokenmill import LLM, SamplingParams  # noqa: E402

PROMPTS = [[(37 * i + 11 * j) % 2000 + 5 for i in range(20 + 37 * j)] for j in range(6)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.95, seed=3, max_tokens=24, ignore_eos=True)
ENGINE = dict(dtype="bfloat16", max_model_len=2048, enable_sleep_mode=True, kv_cache_memory=2 << 30)


def _tokens(llm, prompts=PROMPTS, params=GREEDY):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    a, _ = hf_folder(tmp_path_factory, "llama", 0.5)
    import shutil
    b = str(tmp_path_factory.mktemp("llama-b"))
    shutil.copytree(a, b, dirs_exist_ok=True)
    from safetensors.torch import load_file, save_file
    tensors = load_file(f"{b}/model.safetensors")
    gen = torch.Generator().manual_seed(7)
    for name, t in tensors.items():
        if "norm" not in name:
            t.copy_(torch.randn(t.shape, generator=gen, dtype=torch.float32).to(t.dtype) * 0.5 * t.float().std())
    save_file(tensors, f"{b}/model.safetensors")
    return a, b


def _free_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0] / 2**30


def test_sleep_returns_memory_and_wakes_identically(folders):
    a, _ = folders
    with LLM(a, **ENGINE) as llm:
        before = _tokens(llm)
        free_before = _free_gib()
        llm.sleep(level=1)
        free_asleep = _free_gib()
        assert free_asleep - free_before > 1.9  # the 2 GiB KV pool at least, graphs and weights besides
        llm.wake_up()
        assert abs(_free_gib() - free_before) < 0.5
        assert _tokens(llm) == before


def test_updates_equal_a_fresh_engine(folders):
    a, b = folders
    with LLM(b, **ENGINE) as llm:
        expected_b = _tokens(llm)
    ctx = multiprocessing.get_context("spawn")
    with LLM(a, **ENGINE) as llm:
        expected_a = _tokens(llm)
        assert expected_a != expected_b
        assert llm.update_weights_from_disk(b) > 0
        assert _tokens(llm) == expected_b
        # CUDA IPC from a second process: checkpoint-engine's protocol.
        queue, done = ctx.Queue(), ctx.Event()
        address = f"ipc://{tempfile.mkdtemp()}/w"
        trainer = ctx.Process(target=trainer_cuda_ipc, args=(a, address, "stream", queue, done))
        trainer.start()
        try:
            assert queue.get(timeout=120) == "bound"
            uuid = llm.collective_rpc("report_device_id")[0]
            assert uuid.startswith("GPU-")
            llm.update_weights_from_ipc({uuid: address})
            trainer.join(120)
        finally:  # a sender left waiting for acks would hold pytest's exit (it joins its children)
            if trainer.is_alive():
                trainer.kill()
        assert _tokens(llm) == expected_a
        # One handle per tensor (vLLM's colocated example).
        trainer = ctx.Process(target=trainer_cuda_ipc, args=(b, address, "handles", queue, done))
        trainer.start()
        try:
            llm.update_weights_from_ipc_handles(queue.get(timeout=120))
        finally:
            done.set()
            trainer.join(120)
        assert _tokens(llm) == expected_b
        # Level 2: weights dropped, pushed from this process while the KV cache sleeps.
        from safetensors.torch import load_file
        llm.sleep(level=2)
        llm.wake_up(["weights"])
        llm.update_weights_from_tensors({k: v.cuda() for k, v in load_file(f"{a}/model.safetensors").items()})
        llm.wake_up(["kv_cache"])
        assert _tokens(llm) == expected_a


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_batch_invariant_tokens_do_not_depend_on_the_batch(name, tmp_path_factory):
    folder, _ = hf_folder(tmp_path_factory, name, 0.05)
    engine = dict(dtype="bfloat16", max_model_len=2048, batch_invariant=True, gpu_memory_utilization=0.3)
    with LLM(folder, **engine) as llm:
        alone = [_tokens(llm, [p])[0] for p in PROMPTS]
        alone_seeded = [_tokens(llm, [p], SEEDED)[0] for p in PROMPTS[:2]]
        assert _tokens(llm, PROMPTS * 8) == alone * 8  # decode batches of 48 in graphs, prefix hits
        assert _tokens(llm, PROMPTS[:2] + PROMPTS, [SEEDED] * 2 + [GREEDY] * 6) == alone_seeded + alone
    with LLM(folder, max_num_batched_tokens=64, num_gpu_blocks_override=48, enable_prefix_caching=False,
             **engine) as llm:
        assert _tokens(llm, PROMPTS * 2) == alone * 2  # chunked prefill and preemption
        assert llm.engine.core.scheduler.num_preemptions > 0


def _family_folder(tmp_path_factory, name: str, seed: int) -> str:
    """DeepSeek-V3 at its real attention widths as a block-FP8 checkpoint (e4m3 weights with
    128x128 block scales: MLA projections and stacked experts), or the MiniMax hybrid (lightning
    attention's state slots beside the KV cache); `seed` picks the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fp8_checkpoints import save_block_fp8
    from test_hybrid_gpu import BASE as HYBRID_BASE
    from test_hybrid_gpu import SHAPES as HYBRID_SHAPES
    from test_mla_gpu import SHAPES as MLA_SHAPES
    from test_mla_gpu import WIDTHS as MLA_WIDTHS

    values = {**MLA_WIDTHS, **MLA_SHAPES["v3"]} if name == "deepseek_v3_fp8" else {**HYBRID_BASE, **HYBRID_SHAPES[name]}
    # Peaky logits (0.5): a fresh engine and an updated one may pick other launch configurations
    # (autotuned sums in another order); greedy margins must be far above that rounding.
    config = AutoConfig.for_model(values.pop("model_type"), initializer_range=0.5, **values)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    folder = str(tmp_path_factory.mktemp(f"{name}_{seed}"))
    if name == "deepseek_v3_fp8":
        save_block_fp8(model, folder, skip=("mlp.gate",))
    else:
        model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", ["deepseek_v3_fp8", "minimax"])
def test_mla_fp8_moe_and_hybrid_sleep_and_update(name, tmp_path_factory):
    """Sleep frees the latent cache (or the state slots and KV blocks) with the graphs and weights,
    waking gives identical tokens, and an update from disk equals a fresh engine on it."""
    if name == "deepseek_v3_fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 weights need compute capability 8.9+")
    a, b = (_family_folder(tmp_path_factory, name, seed) for seed in (0, 1))
    prompts = PROMPTS[:4]
    with LLM(b, **ENGINE) as llm:
        expected_b = _tokens(llm, prompts)
    with LLM(a, **ENGINE) as llm:
        before = _tokens(llm, prompts)
        assert before != expected_b
        llm.reset_prefix_cache()  # the repeat computes as the first run did (no hits)
        assert _tokens(llm, prompts) == before, "not repeatable before any sleep"
        free_before = _free_gib()
        llm.sleep(level=1)
        assert _free_gib() - free_before > 1.9  # the 2 GiB of cache at least
        llm.wake_up()
        assert _tokens(llm, prompts) == before
        llm.update_weights_from_disk(b)
        assert _tokens(llm, prompts) == expected_b
