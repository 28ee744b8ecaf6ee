"""Small host-to-device copies (`utils/transfer.py`) are enqueued behind the stream's work, not
waited on: the host returns from them while a long kernel still runs, and the values arrive.
Skipped without CUDA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from tokenmill.utils.transfer import index_tensor, to_device  # noqa: E402

BUSY_CYCLES = 2_000_000_000  # ~1 s of a spinning kernel: far longer than the host needs to enqueue


@pytest.mark.parametrize("make", [
    lambda dev: index_tensor([3, 1, 4, 1, 5], dev),
    lambda dev: to_device(np.array([[2, -1], [7, 8]], dtype=np.int64), torch.int64, dev),
    lambda dev: to_device([0.5, -2.0], torch.bfloat16, dev),
])
def test_copies_do_not_wait_for_the_stream(make):
    device = torch.device("cuda")
    stream = torch.cuda.current_stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    tensors = [make(device) for _ in range(8)]  # repeated: reused pinned blocks must not wait either
    still_busy = not stream.query()
    torch.cuda.synchronize()
    assert still_busy, "a host-to-device copy waited for the kernel queued before it"
    expected = make(torch.device("cpu"))
    for t in tensors:
        assert t.device.type == "cuda" and t.dtype == expected.dtype
        assert torch.equal(t.cpu(), expected)


def test_reused_pinned_blocks_keep_each_copy_its_own_values():
    """The caching host allocator must not hand a block to the next copy before the last one read it."""
    torch.cuda._sleep(BUSY_CYCLES // 4)
    tensors = [index_tensor([i] * 16, torch.device("cuda")) for i in range(64)]
    torch.cuda.synchronize()
    assert [int(t[0]) for t in tensors] == list(range(64)) and all(bool((t == t[0]).all()) for t in tensors)


@pytest.mark.parametrize("num_reqs,reqs,num_blocks", [(3, 4, 5), (1, 1, 5), (2, 2, 16), (6, 8, 1)])
def test_block_table_corner_arrives_whole_without_a_pageable_copy(num_reqs, reqs, num_blocks):
    """A step's [requests, blocks] corner of the block table (padded rows zero) lands on the device
    and nothing outside it changes, whether the corner is strided (packed rows, spread on the
    device) or not; no copy from pageable memory either way."""
    from torch.profiler import ProfilerActivity, profile

    from tokenmill.worker.input_buffers import InputBuffers
    buffers = InputBuffers(max_tokens=64, max_reqs=8, max_blocks=16, device=torch.device("cuda"))
    buffers.block_table.device_tensor.fill_(-7)
    table = np.arange(1, num_reqs * num_blocks + 1, dtype=np.int32).reshape(num_reqs, num_blocks)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for turn in (0, 1):
            buffers._stage_block_table(turn, table + turn, reqs)
        torch.cuda.synchronize()
    expected = torch.full((8, 16), -7, dtype=torch.int32)
    expected[:reqs, :num_blocks] = 0
    expected[:num_reqs, :num_blocks] = torch.from_numpy(table + 1)
    assert torch.equal(buffers.block_table.device_tensor.cpu(), expected)
    assert not [e for e in prof.events() if "Pageable" in e.name]


@pytest.mark.parametrize("batch", [1, 10])
def test_decode_steps_copy_nothing_from_pageable_memory(batch):
    """Steady decode steps (async scheduling, decode graphs) enqueue their host-to-device copies from
    pinned memory only: a pageable one makes the host wait for the step before (see above), which
    shows as idle GPU time between steps. On failure: the ops that issued one, with their Python stack."""
    import random

    from torch.profiler import ProfilerActivity, profile

    from tokenmill import LLM, SamplingParams
    from tokenmill.benchmarks.gpu_step_profile import pageable_copy_issuers

    with LLM("qwen3-0.6b", load_format="dummy", dtype="bfloat16", max_num_seqs=16, max_model_len=1024,
             gpu_memory_utilization=0.3) as llm:
        engine = llm.engine
        rng = random.Random(0)
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        for i in range(batch):
            engine.add_request(str(i), [rng.randrange(1000, 20000) for _ in range(300)], params)
        while engine.core.scheduler.waiting or any(
                r.num_computed_tokens < r.num_prompt_tokens for r in engine.core.scheduler.running):
            engine.step()
        for _ in range(8):
            engine.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            for _ in range(8):
                engine.step()
            torch.cuda.synchronize()
    copies = [e for e in prof.events() if "Pageable" in e.name and "HtoD" in e.name]
    issuers = pageable_copy_issuers(prof)
    assert not copies, f"{len(copies)} pageable host-to-device copies in 8 steps:\n" + "\n".join(issuers[:8])
