"""The fused all-reduce + add + RMSNorm kernel's wire protocol, on the CPU.

`distributed/all_reduce_rms_norm.py` has each rank push its row into every peer's buffer as words
stamped with a call number, and each rank poll its own buffer. Here every "rank" is a process
running the kernel on Triton's CPU interpreter, the "symmetric buffers" are shared-memory tensors
each process sees at its own addresses, and the ranks really wait for each other. A sequence of
calls with alternating slots and changing row counts must give every rank the reference result,
bit-identical across ranks; the calls without a residual (the embeddings' sum) give the normed
sum and the sum. (On GPUs `scripts/bench_all_reduce.py` checks the same across
NVLink, run by tests/gpu/test_tensor_parallel_gpu.py.)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

HIDDEN = 64
REGION_WORDS = 512
MAX_ROWS = 4
# (rows, slot) per call, as forward passes make them: the embeddings' sum (slot 2, no residual),
# then slots alternating as the norms use them; row counts change between passes.
CALLS = [(1, 2), (1, 0), (1, 1), (1, 0), (1, 1), (3, 2), (3, 0), (3, 1), (2, 2), (2, 0), (2, 1)]
NO_RESIDUAL_SLOT = 2


def _inputs(world: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(world)
    parts = [[torch.randn(rows, HIDDEN, generator=gen).to(dtype) for _ in range(world)] for rows, _ in CALLS]
    residuals = [None if slot == NO_RESIDUAL_SLOT else torch.randn(rows, HIDDEN, generator=gen).to(dtype)
                 for rows, slot in CALLS]
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
    return parts, residuals, weight


def _rank(rank, world, dtype, buffers, outs, res_outs):
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported in this process
    from tokenmill.distributed.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm

    parts, residuals, weight = _inputs(world, dtype)
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)  # this process's view
    counters = torch.zeros(NUM_SLOTS, MAX_ROWS, dtype=torch.int32)
    for i, (rows, slot) in enumerate(CALLS):
        out, res = all_reduce_add_rms_norm(parts[i][rank], residuals[i], weight, 1e-5, buffer_ptrs, counters,
                                           slot, REGION_WORDS, rank, world)
        outs[i][:rows].copy_(out)
        res_outs[i][:rows].copy_(res)


@pytest.mark.parametrize("world,dtype", [(2, torch.float16), (2, torch.float32), (3, torch.float16)])
def test_every_rank_gets_the_sum_added_and_normed_bit_identically(world, dtype):
    from tokenmill.distributed.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm_ref

    buffers = [torch.zeros(NUM_SLOTS * world * REGION_WORDS, dtype=torch.int64).share_memory_() for _ in range(world)]
    outs = [[torch.zeros(MAX_ROWS, HIDDEN, dtype=dtype).share_memory_() for _ in CALLS] for _ in range(world)]
    res_outs = [[torch.zeros(MAX_ROWS, HIDDEN, dtype=dtype).share_memory_() for _ in CALLS] for _ in range(world)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, world, dtype, buffers, outs[r], res_outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, "a rank never saw its peers' rows"
    assert all(p.exitcode == 0 for p in procs)

    parts, residuals, weight = _inputs(world, dtype)
    for i, (rows, _) in enumerate(CALLS):
        want_out, want_res = all_reduce_add_rms_norm_ref(parts[i], residuals[i], weight, 1e-5)
        for r in range(world):
            assert torch.equal(res_outs[r][i][:rows], want_res), (i, r)
            torch.testing.assert_close(outs[r][i][:rows], want_out, rtol=2e-3, atol=2e-3)
            assert torch.equal(outs[r][i], outs[0][i]) and torch.equal(res_outs[r][i], res_outs[0][i])
