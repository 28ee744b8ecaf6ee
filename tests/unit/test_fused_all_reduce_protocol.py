"""The fused all-reduce + add + RMSNorm kernel's wire protocol, on the CPU.

`ops/all_reduce_rms_norm.py` has each rank push its row into every peer's buffer as words
stamped with a call number, and each rank poll its own buffer. Here every "rank" is a process
running the kernel on Triton's CPU interpreter, the "symmetric buffers" are shared-memory tensors
each process sees at its own addresses, and the ranks really wait for each other. A sequence of
calls with alternating slots and changing row counts must give every rank the reference result,
bit-identical across ranks; calls without a residual give the normed sum and the sum. (On GPUs
`tokenmill/benchmarks/kernels/all_reduce.py` checks the same across NVLink, run by
tests/gpu/test_tensor_parallel_gpu.py.)
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

HIDDEN = 64
REGION_WORDS = 512
MAX_ROWS = 4
# (rows, slot) per call, slots alternating as the communicator assigns them (distributed/symm_mem.py);
# row counts change between forward passes. The calls at NO_RESIDUAL have no residual to add.
CALLS = [(1, 0), (1, 1), (1, 0), (1, 1), (3, 0), (3, 1), (3, 0), (3, 1), (2, 0), (2, 1)]
NO_RESIDUAL = {0, 4, 7}


def _inputs(world: int, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(world)
    parts = [[torch.randn(rows, HIDDEN, generator=gen).to(dtype) for _ in range(world)] for rows, _ in CALLS]
    residuals = [None if i in NO_RESIDUAL else torch.randn(rows, HIDDEN, generator=gen).to(dtype)
                 for i, (rows, slot) in enumerate(CALLS)]
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(dtype)
    return parts, residuals, weight


def _rank(rank, world, dtype, buffers, outs, res_outs):
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported in this process
    from tokenmill.ops.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm

    parts, residuals, weight = _inputs(world, dtype)
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)  # this process's view
    counters = torch.zeros(NUM_SLOTS, MAX_ROWS, dtype=torch.int32)
    for i, (rows, slot) in enumerate(CALLS):
        out, res = all_reduce_add_rms_norm(parts[i][rank], residuals[i], weight, 1e-5, buffer_ptrs, counters,
                                           slot, REGION_WORDS, rank, world)
        outs[i][:rows].copy_(out)
        res_outs[i][:rows].copy_(res)


def _run_ranks(target, args_per_rank: list[tuple]) -> None:
    """One spawned process per rank, running `target(*args)`; all must finish, and cleanly."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for args in args_per_rank]
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


@pytest.mark.parametrize("world,dtype", [(2, torch.float16), (2, torch.float32), (3, torch.float16)])
def test_every_rank_gets_the_sum_added_and_normed_bit_identically(world, dtype):
    from tokenmill.ops.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm_ref

    buffers = [torch.zeros(NUM_SLOTS * world * REGION_WORDS, dtype=torch.int64).share_memory_() for _ in range(world)]
    outs = [[torch.zeros(MAX_ROWS, HIDDEN, dtype=dtype).share_memory_() for _ in CALLS] for _ in range(world)]
    res_outs = [[torch.zeros(MAX_ROWS, HIDDEN, dtype=dtype).share_memory_() for _ in CALLS] for _ in range(world)]
    _run_ranks(_rank, [(r, world, dtype, buffers, outs[r], res_outs[r]) for r in range(world)])

    parts, residuals, weight = _inputs(world, dtype)
    for i, (rows, _) in enumerate(CALLS):
        want_out, want_res = all_reduce_add_rms_norm_ref(parts[i], residuals[i], weight, 1e-5)
        for r in range(world):
            assert torch.equal(res_outs[r][i][:rows], want_res), (i, r)
            torch.testing.assert_close(outs[r][i][:rows], want_out, rtol=2e-3, atol=2e-3)
            assert torch.equal(outs[r][i], outs[0][i]) and torch.equal(res_outs[r][i], res_outs[0][i])


# Batch-1 decode as the model runs it at TP=2: per layer the attention's output projection and the
# MLP's down projection, each a GEMV that pushes its row to the peer itself (`gemv(push=...)`),
# summed by the fused kernel with `pushed=True`; unpushed sums in between (an eager step), which
# must take the same call numbers in turn. (slot, pushed) per call; K columns per rank's GEMV.
PUSH_CALLS = [(0, True), (1, True), (0, True), (1, False), (0, False), (1, True), (0, False), (1, True)]
PUSH_K = 40


def _push_inputs(world: int):
    gen = torch.Generator().manual_seed(100 + world)
    xs = [[torch.randn(1, PUSH_K, generator=gen).half() for _ in range(world)] for _ in PUSH_CALLS]
    ws = [[(0.2 * torch.randn(HIDDEN, PUSH_K, generator=gen)).half() for _ in range(world)] for _ in PUSH_CALLS]
    residuals = [torch.randn(1, HIDDEN, generator=gen).half() for _ in PUSH_CALLS]
    weight = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).half()
    return xs, ws, residuals, weight


def _push_rank(rank, world, buffers, partials, outs, res_outs):
    os.environ["TRITON_INTERPRET"] = "1"
    import triton

    from tokenmill.ops.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm
    from tokenmill.distributed.symm_mem import PushTarget
    from tokenmill.ops import gemv as triton_gemv

    xs, ws, residuals, weight = _push_inputs(world)
    buffer_ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    counters = torch.zeros(NUM_SLOTS, MAX_ROWS, dtype=torch.int32)
    for i, (slot, pushed) in enumerate(PUSH_CALLS):
        x, w = xs[i][rank], ws[i][rank]
        y = torch.empty(1, HIDDEN, dtype=torch.float16)
        target = PushTarget(buffer_ptrs, counters, slot, REGION_WORDS, rank, world)
        # The plain kernel with one config (the autotuner needs a GPU), as gemv(x, w, push=target).
        no_norm = triton_gemv.NormArgs.off(y)
        triton_gemv._gemv_kernel.fn[(triton.cdiv(HIDDEN, 4),)](
            x, w, y, HIDDEN, PUSH_K, w.stride(0), buffer_ptrs, counters, slot, REGION_WORDS, *no_norm.kernel_args(),
            SILU_MUL=False, PUSH=pushed, RANK=rank, WORLD=world, MAX_ROWS=MAX_ROWS, **no_norm.meta(PUSH_K),
            BLOCK_N=4, BLOCK_K=32)
        assert target.slot == slot
        out, res = all_reduce_add_rms_norm(y, residuals[i], weight, 1e-5, buffer_ptrs, counters, slot,
                                           REGION_WORDS, rank, world, pushed=pushed)
        partials[i].copy_(y)
        outs[i].copy_(out)
        res_outs[i].copy_(res)


def test_rows_pushed_by_the_gemv_are_summed_by_the_fused_kernel():
    from tokenmill.ops.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm_ref

    world = 2
    buffers = [torch.zeros(NUM_SLOTS * world * REGION_WORDS, dtype=torch.int64).share_memory_() for _ in range(world)]
    made = lambda: [[torch.zeros(1, HIDDEN, dtype=torch.float16).share_memory_() for _ in PUSH_CALLS]  # noqa: E731
                    for _ in range(world)]
    partials, outs, res_outs = made(), made(), made()
    _run_ranks(_push_rank, [(r, world, buffers, partials[r], outs[r], res_outs[r]) for r in range(world)])

    xs, ws, residuals, weight = _push_inputs(world)
    for i in range(len(PUSH_CALLS)):
        for r in range(world):  # each rank's GEMV is right
            want = (xs[i][r].float() @ ws[i][r].float().T)
            torch.testing.assert_close(partials[r][i].float(), want, rtol=2e-2, atol=2e-2)
        want_out, want_res = all_reduce_add_rms_norm_ref([partials[r][i] for r in range(world)], residuals[i],
                                                         weight, 1e-5)
        for r in range(world):
            assert torch.equal(res_outs[r][i], want_res), (i, r)
            torch.testing.assert_close(outs[r][i], want_out, rtol=2e-3, atol=2e-3)
