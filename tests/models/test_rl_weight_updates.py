"""RL rollouts on the CPU (docs/rl.md): generate with weights A, update in place to weights B (from
disk, from tensors, over a gloo group from a separate trainer process, over IPC from a colocated
one) and get exactly what a fresh engine on B gives, with no prefix-cache block of A ever reused;
sleep/wake round trips give identical outputs and free the memory; collective_rpc reaches every
rank's extension; the same over two tensor-parallel ranks."""

from __future__ import annotations

import gc
import multiprocessing
import os
import tempfile
import weakref

import pytest
import torch

from rl_models import (free_port, join, make_checkpoints, trainer_broadcast, trainer_ipc_handles,
                       trainer_ipc_stream)
from tokenmill import LLM, SamplingParams
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.config import EngineArgs

PROMPTS = [[(7 * i + 3 + j) % 160 for i in range(21 + 5 * j)] for j in range(4)]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
ENGINE = dict(dtype="float32", block_size=4, kv_cache_memory=8 << 20)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoints(str(tmp_path_factory.mktemp("rl")))


def _outputs(llm: LLM) -> list:
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False) + llm.generate(PROMPTS[:2], SEEDED, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def _cached(llm: LLM) -> list[int]:
    return [o.num_cached_tokens for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def reference(ckpt):
    """Fresh engines on A and on B: the outputs every update must reproduce exactly."""
    with LLM(ckpt.a, **ENGINE) as llm:
        a = _outputs(llm)
    with LLM(ckpt.b, **ENGINE) as llm:
        b = _outputs(llm)
    assert a != b
    return {"a": a, "b": b}


def test_update_from_disk_and_tensors_equals_fresh_engine(ckpt, reference):
    with LLM(ckpt.a, **ENGINE) as llm:
        assert _outputs(llm) == reference["a"]
        assert all(n > 0 for n in _cached(llm))  # A's prompts are in the prefix cache
        assert llm.update_weights_from_disk(ckpt.b) == 15
        # Exactly B, and none of A's cached blocks served a prompt.
        assert _cached(llm) == [0] * len(PROMPTS)
        assert _outputs(llm) == reference["b"]
        assert all(n > 0 for n in _cached(llm))  # B's own blocks are cached again
        # Back to A from in-process tensors: any subset, in any number of calls.
        hf_a = ckpt_tensors(ckpt.a)
        head = {"lm_head.weight": hf_a.pop("lm_head.weight")}
        assert llm.update_weights_from_tensors(hf_a) == 14
        assert llm.update_weights_from_tensors(list(head.items())) == 1
        assert _outputs(llm) == reference["a"]


def test_unknown_tensor_is_refused(ckpt):
    with LLM(ckpt.a, **ENGINE) as llm:
        with pytest.raises(ValueError, match="no matching parameter"):
            llm.update_weights_from_tensors({"model.layers.0.self_attn.nope.weight": torch.zeros(4)})
        with pytest.raises(FileNotFoundError):
            llm.update_weights_from_disk(os.path.join(ckpt.a, "missing"))


def test_request_running_across_an_update_never_publishes_its_blocks(ckpt, reference):
    engine = LLMEngine.from_engine_args(EngineArgs(model=ckpt.a, **ENGINE))
    try:
        long = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        engine.add_request("across", PROMPTS[3], long)
        for _ in range(3):
            engine.step()  # prompt computed with A, a few tokens decoded
        engine.core.update_weights_from_tensors(list(ckpt.weights_b.items()))
        while engine.has_unfinished_requests():
            engine.step()
        # Its blocks mix A's and B's K/V: a new request with the same prompt must not hit them.
        engine.add_request("after", PROMPTS[3], GREEDY)
        outs = []
        while engine.has_unfinished_requests():
            outs += engine.step()
        assert outs[-1].num_cached_tokens == 0
        assert outs[-1].outputs[0].token_ids == reference["b"][3]
    finally:
        engine.core.shutdown()


@pytest.mark.slow
def test_update_from_trainer_over_gloo_group(ckpt, reference):
    ctx = multiprocessing.get_context("spawn")
    with LLM(ckpt.a, **ENGINE) as llm:
        _cached(llm)
        port = free_port()
        trainer = ctx.Process(target=trainer_broadcast, args=(ckpt.b, port, 2, "rollout-sync"))
        trainer.start()
        try:
            llm.init_weights_update_group("127.0.0.1", port, rank_offset=1, world_size=2, group_name="rollout-sync")
            names = list(ckpt.weights_b)
            loaded = llm.update_weights_from_distributed(
                names, [ckpt.weights_b[n].dtype for n in names], [list(ckpt.weights_b[n].shape) for n in names],
                group_name="rollout-sync", bucket_bytes=64 << 10)  # several buckets
        finally:
            assert join(trainer) == 0
        assert loaded == 15
        assert _cached(llm) == [0] * len(PROMPTS)
        assert _outputs(llm) == reference["b"]
        llm.destroy_weights_update_group("rollout-sync")
        with pytest.raises(ValueError, match="no weight update group"):
            llm.update_weights_from_distributed(["lm_head.weight"], ["float32"], [[160, 64]], group_name="rollout-sync")


@pytest.mark.slow
def test_update_over_ipc_from_colocated_trainer(ckpt, reference):
    ctx = multiprocessing.get_context("spawn")
    with LLM(ckpt.a, **ENGINE) as llm:
        # checkpoint-engine's protocol, reached through collective_rpc as checkpoint-engine does.
        address = f"ipc://{tempfile.mkdtemp(prefix='tm-ipc-')}/weights"
        ready = ctx.Event()
        trainer = ctx.Process(target=trainer_ipc_stream, args=(ckpt.b, address, 48 << 10, ready))
        trainer.start()
        assert ready.wait(60)
        assert llm.collective_rpc("update_weights_from_ipc", args=({"cpu": address},)) == [15]
        assert join(trainer) == 0
        assert _outputs(llm) == reference["b"]
        # vLLM's colocated form: one handle per tensor.
        handles, done = ctx.Queue(), ctx.Event()
        trainer = ctx.Process(target=trainer_ipc_handles, args=(ckpt.a, handles, done))
        trainer.start()
        try:
            assert llm.update_weights_from_ipc_handles(handles.get(timeout=60)) == 15
        finally:
            done.set()
            assert join(trainer) == 0
        assert _outputs(llm) == reference["a"]


def test_sleep_wake_round_trips_and_frees_memory(ckpt, reference):
    with LLM(ckpt.a, **ENGINE) as llm:
        with pytest.raises(ValueError, match="enable_sleep_mode"):
            llm.sleep()
    with LLM(ckpt.a, enable_sleep_mode=True, **ENGINE) as llm:
        worker = llm.engine.core.executor.driver_worker
        kv_ref = weakref.ref(worker.runner.kv_caches[0][0])
        weight_ref = weakref.ref(worker.model.lm_head.weight.data)
        llm.sleep(level=1)
        gc.collect()
        assert llm.is_sleeping() and kv_ref() is None and weight_ref() is None
        assert worker.model.lm_head.weight.numel() == 0
        with pytest.raises(RuntimeError, match="asleep"):
            llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        llm.wake_up()
        assert not llm.is_sleeping()
        assert _outputs(llm) == reference["a"]
        # Level 2 drops the weights: wake them alone, push B, then the KV cache.
        llm.sleep(level=2)
        llm.wake_up(tags=["weights"])
        assert llm.is_sleeping()
        llm.update_weights_from_tensors(ckpt.weights_b)
        llm.wake_up(tags=["kv_cache"])
        assert not llm.is_sleeping()
        assert _outputs(llm) == reference["b"]
        llm.sleep(level=1)
        with pytest.raises(ValueError, match="wake_up"):
            llm.update_weights_from_disk(ckpt.a)
        llm.wake_up()


def test_sleep_preempts_running_requests_which_resume_after_waking(ckpt, reference):
    engine = LLMEngine.from_engine_args(EngineArgs(model=ckpt.a, enable_sleep_mode=True, **ENGINE))
    try:
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, GREEDY)
        engine.add_request("s", PROMPTS[0], SEEDED)
        outs = engine.step() + engine.step()
        engine.core.sleep(level=1)
        assert not engine.core.has_unfinished_requests()  # nothing is scheduled while asleep
        engine.core.wake_up()
        while engine.has_unfinished_requests():
            outs += engine.step()
        done = {o.request_id: o.outputs[0].token_ids for o in outs if o.finished}
        assert [done[str(i)] for i in range(len(PROMPTS))] == reference["a"][:len(PROMPTS)]
        assert done["s"] == reference["a"][len(PROMPTS)]  # the seeded stream continues
    finally:
        engine.core.shutdown()


def test_collective_rpc_reaches_the_extension(ckpt, reference):
    with LLM(ckpt.a, worker_extension_cls="rl_worker_ext.WeightProbe", **ENGINE) as llm:
        [(rank, total)] = llm.collective_rpc("weight_sum", kwargs={"scale": 2.0})
        expected = sum(float(v.double().sum()) for v in ckpt_tensors(ckpt.a).values())
        assert rank == 0 and total == pytest.approx(2 * expected, rel=1e-9)
        _cached(llm)
        assert llm.collective_rpc("load_checkpoint_file", args=[ckpt.b]) == [15]
        assert _cached(llm) == [0] * len(PROMPTS)  # dropped: the extension may change the weights
        assert _outputs(llm) == reference["b"]
        with pytest.raises(ValueError, match="not a worker extension method"):
            llm.collective_rpc("shutdown")
    with pytest.raises(ValueError, match="cannot be imported"):
        LLM(ckpt.a, worker_extension_cls="rl_worker_ext.Missing", **ENGINE)


def ckpt_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(os.path.join(path, "model.safetensors"))


@pytest.mark.slow
def test_tensor_parallel_updates_sleep_and_rpc(ckpt, monkeypatch):
    """Two gloo ranks: each takes its shard of every update through the same weight loaders."""
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]))
    tp = dict(ENGINE, tensor_parallel_size=2)
    with LLM(ckpt.b, **tp) as llm:
        expected_b = _outputs(llm)
    with LLM(ckpt.a, **tp) as llm:
        expected_a = _outputs(llm)
    ctx = multiprocessing.get_context("spawn")
    with LLM(ckpt.a, enable_sleep_mode=True, worker_extension_cls="rl_worker_ext.WeightProbe", **tp) as llm:
        assert llm.update_weights_from_disk(ckpt.b) == 15
        assert _cached(llm) == [0] * len(PROMPTS)
        assert _outputs(llm) == expected_b
        llm.update_weights_from_tensors(ckpt_tensors(ckpt.a))  # rank 0 broadcasts over the TP group
        assert _outputs(llm) == expected_a
        port = free_port()
        trainer = ctx.Process(target=trainer_broadcast, args=(ckpt.b, port, 3, "weight_update_group"))
        trainer.start()
        try:
            llm.init_weights_update_group("127.0.0.1", port, rank_offset=1, world_size=3)
            names = list(ckpt.weights_b)
            llm.update_weights_from_distributed(names, ["float32"] * len(names),
                                                [list(ckpt.weights_b[n].shape) for n in names])
        finally:
            assert join(trainer) == 0
        assert _outputs(llm) == expected_b
        sums = llm.collective_rpc("weight_sum")
        assert [rank for rank, _ in sums] == [0, 1] and sums[0][1] != sums[1][1]
        llm.sleep(level=2)
        llm.wake_up(["weights"])
        llm.update_weights_from_disk(ckpt.a)
        llm.wake_up()
        assert _outputs(llm) == expected_a
