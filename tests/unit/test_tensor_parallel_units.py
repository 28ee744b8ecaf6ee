"""Pure pieces of tensor parallelism: how heads split over ranks, and the typed step messages."""

from __future__ import annotations

import msgspec
import pytest

from tokenmill.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from tokenmill.distributed.messages import DriverMessage, WorkerShutdown, WorkerStep
from tokenmill.model.layers.linear import head_partition
from tokenmill.sampling_params import SamplingParams


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 2), (9, 3, 3), (32, 8, 2), (32, 8, 4), (32, 8, 8),
                                         (64, 8, 8), (16, 8, 3), (4, 1, 2), (4, 1, 4), (8, 2, 4), (8, 2, 8)])
def test_head_partition_covers_every_head_once_with_its_kv_group(heads, kv, tp):
    parts = [head_partition(heads, kv, tp, rank) for rank in range(tp)]
    group = heads // kv
    q_seen = []
    for q_start, q_count, kv_start, kv_count in parts:
        assert q_count >= 1 and kv_count >= 1
        q_seen += range(q_start, q_start + q_count)
        # Every query head on this rank reads a KV head this rank holds.
        for q in range(q_start, q_start + q_count):
            assert kv_start <= q // group < kv_start + kv_count
    assert q_seen == list(range(heads))
    counts = [p[1] for p in parts]
    assert max(counts) - min(counts) <= group  # as even as whole KV groups allow


@pytest.mark.parametrize("heads,kv,tp", [(9, 3, 4), (4, 1, 8), (12, 5, 2)])
def test_head_partition_rejects_impossible_splits(heads, kv, tp):
    with pytest.raises(ValueError):
        for rank in range(tp):
            head_partition(heads, kv, tp, rank)


def test_step_message_round_trips_without_pickle():
    sched = SchedulerOutput(
        new_requests=[NewRequestData("a", [1, 2, 3], 3, SamplingParams(temperature=0.5, seed=3, max_tokens=7),
                                     [4, 5], 0, eos_token_id=2)],
        cached_requests=[CachedRequestData("b", [9], 17)],
        num_scheduled_tokens={"a": 3, "b": 1}, total_num_scheduled_tokens=4,
        finished_request_ids={"c"}, preempted_request_ids={"d"})
    frame = msgspec.msgpack.encode(WorkerStep(sched, {"b": [42]}))
    decoded = msgspec.msgpack.Decoder(DriverMessage).decode(frame)
    assert decoded == WorkerStep(sched, {"b": [42]})
    assert isinstance(msgspec.msgpack.Decoder(DriverMessage).decode(msgspec.msgpack.encode(WorkerShutdown())),
                      WorkerShutdown)


def test_impossible_split_is_refused_before_any_worker_starts():
    from tokenmill.config import EngineArgs

    # The embedded SmolLM2-135M: 3 KV heads cannot be split or replicated over 4 ranks.
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        EngineArgs(tensor_parallel_size=4, device="cpu").create_engine_config()
    with pytest.raises(ValueError, match=">= 1"):
        EngineArgs(tensor_parallel_size=0, device="cpu").create_engine_config()
    assert EngineArgs(tensor_parallel_size=3, device="cpu").create_engine_config().parallel.tensor_parallel_size == 3


def test_small_sums_take_the_symmetric_memory_path_and_the_rest_nccl(monkeypatch):
    """`tp_all_reduce` dispatch: tensors the one-shot buffer can hold (dtype, size, contiguity) go
    to it, everything else to torch.distributed. (The kernel itself runs only on GPUs:
    tests/gpu/test_tensor_parallel_gpu.py.)"""
    import torch

    from tokenmill.distributed import parallel_state
    from tokenmill.distributed.symm_mem_all_reduce import SymmMemAllReduce, locally_supported

    assert not locally_supported(torch.device("cpu"), 2)
    comm = object.__new__(SymmMemAllReduce)  # no GPU here: only the size/dtype rule
    comm.dtype, comm.max_numel = torch.bfloat16, 1024
    took_symm, took_nccl = [], []
    monkeypatch.setattr(comm, "all_reduce_", lambda x: took_symm.append(x.shape) or x, raising=False)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, group=None: took_nccl.append(x.shape))
    monkeypatch.setattr(parallel_state, "_SYMM_MEM", comm)
    parallel_state.set_tensor_parallel(0, 2, None)
    try:
        parallel_state.tp_all_reduce(torch.zeros(1, 1024, dtype=torch.bfloat16))  # fits
        parallel_state.tp_all_reduce(torch.zeros(2, 1024, dtype=torch.bfloat16))  # too big
        parallel_state.tp_all_reduce(torch.zeros(1, 512, dtype=torch.float32))  # other dtype
        parallel_state.tp_all_reduce(torch.zeros(64, 16, dtype=torch.bfloat16).t())  # strided
    finally:
        parallel_state.set_tensor_parallel(0, 1, None)
    assert took_symm == [(1, 1024)]
    assert took_nccl == [(2, 1024), (1, 512), (16, 64)]


def test_norm_after_a_row_parallel_layer_fuses_the_sum_where_it_can(monkeypatch):
    """`RMSNorm.reduce_add` dispatch: decode-sized rows go to the fused all-reduce + add + norm
    kernel with the caller's slot; other shapes fall back to the all-reduce, then the norm, with
    the same result as before the fusion. (The kernel runs only on GPUs: bench_all_reduce.py,
    run by tests/gpu/test_tensor_parallel_gpu.py.)"""
    import torch

    from tokenmill.distributed import parallel_state
    from tokenmill.distributed.symm_mem_all_reduce import SymmMemAllReduce
    from tokenmill.model.layers.basic import RMSNorm

    comm = object.__new__(SymmMemAllReduce)
    comm.dtype, comm.max_numel, comm.fused_region_words, comm.max_fused_rows = torch.float32, 1 << 20, 4096, 2
    fused_calls, summed = [], []

    def fake_fused(x, residual, weight, eps, slot, pushed):
        assert not pushed  # no GEMV ran here
        fused_calls.append((tuple(x.shape), slot))
        return "fused", slot

    def fake_all_reduce(x):  # two identical ranks: the sum is twice this rank's part
        summed.append(tuple(x.shape))
        return x.mul_(2)

    monkeypatch.setattr(comm, "all_reduce_add_rms_norm", fake_fused, raising=False)
    monkeypatch.setattr(comm, "all_reduce_", fake_all_reduce, raising=False)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, group=None: summed.append("nccl"))
    monkeypatch.setattr(parallel_state, "_SYMM_MEM", comm)
    norm = RMSNorm(8, 1e-6)
    norm.weight.data = torch.linspace(0.5, 1.5, 8)
    parallel_state.set_tensor_parallel(0, 2, None)
    try:
        assert parallel_state.fused_all_reduce_norm_active()
        assert norm.reduce_add(torch.ones(2, 8), torch.ones(2, 8), slot=1) == ("fused", 1)
        partial, residual = torch.randn(3, 8), torch.randn(3, 8)  # 3 rows: more than the kernel takes
        want = norm(2 * partial, residual)
        got = norm.reduce_add(partial.clone(), residual, slot=0)
        strided = norm.reduce_add(torch.randn(8, 2).t(), torch.randn(2, 8), slot=0)  # not contiguous
        # The first layer: the embeddings' partial sums, no residual yet (slot 2).
        assert norm.reduce_add(torch.ones(1, 8), None, slot=2) == ("fused", 2)
        embeddings = torch.randn(3, 8)
        first_normed, first_residual = norm.reduce_add(embeddings.clone(), None, slot=2)  # too many rows
    finally:
        parallel_state.set_tensor_parallel(0, 1, None)
    assert fused_calls == [((2, 8), 1), ((1, 8), 2)]
    assert summed == [(3, 8), "nccl", (3, 8)]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert strided[0].shape == (2, 8)
    assert torch.equal(first_residual, 2 * embeddings) and torch.equal(first_normed, norm(2 * embeddings))
    # One rank: no collective at all, the plain fused add + norm.
    partial = torch.randn(2, 8)
    assert all(torch.equal(a, b) for a, b in zip(norm.reduce_add(partial, residual[:2], slot=0),
                                                  norm(partial, residual[:2])))
    normed, same = norm.reduce_add(partial, None, slot=2)
    assert same is partial and torch.equal(normed, norm(partial))
