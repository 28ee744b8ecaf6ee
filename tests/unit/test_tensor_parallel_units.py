"""Pure pieces of tensor parallelism: how heads split over ranks, and the typed step messages."""

from __future__ import annotations

import msgspec
import pytest

from tokenmill.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from tokenmill.executor.messages import DriverMessage, WorkerShutdown, WorkerStep
from tokenmill.config.parallel import head_partition
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
    """`TensorParallelGroup.all_reduce` dispatch: tensors the one-shot buffer can hold (dtype, size,
    contiguity) go to it, everything else to torch.distributed. (The kernel itself runs only on
    GPUs: tests/gpu/test_tensor_parallel_gpu.py.)"""
    import torch

    from tokenmill.distributed.parallel_state import TensorParallelGroup
    from tokenmill.distributed.symm_mem import SymmMemCommunicator, locally_supported

    assert not locally_supported(torch.device("cpu"), 2)
    comm = object.__new__(SymmMemCommunicator)  # no GPU here: only the size/dtype rule
    comm.dtype, comm.max_numel = torch.bfloat16, 1024
    took_symm, took_nccl = [], []
    monkeypatch.setattr(comm, "all_reduce_", lambda x: took_symm.append(x.shape) or x, raising=False)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda x, group=None: took_nccl.append(x.shape))
    group = TensorParallelGroup(0, 2, torch.device("cpu"), communicator=comm)
    group.all_reduce(torch.zeros(1, 1024, dtype=torch.bfloat16))  # fits
    group.all_reduce(torch.zeros(2, 1024, dtype=torch.bfloat16))  # too big
    group.all_reduce(torch.zeros(1, 512, dtype=torch.float32))  # other dtype
    group.all_reduce(torch.zeros(64, 16, dtype=torch.bfloat16).t())  # strided
    assert took_symm == [(1, 1024)]
    assert took_nccl == [(2, 1024), (1, 512), (16, 64)]


def _fused_communicator(dtype, region_words=4096):
    """A `SymmMemCommunicator` with its fused-sum bookkeeping but no GPU buffers."""
    import torch

    from tokenmill.distributed.symm_mem import SymmMemCommunicator

    comm = object.__new__(SymmMemCommunicator)
    comm.dtype, comm.max_numel, comm.fused_region_words = dtype, 1 << 20, region_words
    comm.rank, comm.world_size = 0, 2
    comm.buffer_ptrs = comm.call_counters = torch.zeros(1)
    comm._deferred = comm._deferred_sum = None
    comm._next_slot = 0
    return comm


def test_row_parallel_sums_are_deferred_to_the_next_norm_with_alternating_slots(monkeypatch):
    """A row-parallel layer's sum is deferred where the fused kernel can take it (decode-sized,
    contiguous rows), each deferral taking the next slot; the norm that follows takes it, and
    anything else reaching for it is an error, not a silent unsummed value."""
    import torch

    from tokenmill.distributed.parallel_state import TensorParallelGroup

    comm = _fused_communicator(torch.float32)
    summed = []
    monkeypatch.setattr(comm, "all_reduce_", lambda x: summed.append(tuple(x.shape)) or x, raising=False)
    group = TensorParallelGroup(0, 2, torch.device("cpu"), communicator=comm)
    slots = []
    for _ in range(4):
        x = torch.randn(2, 8)
        assert group.defer_sum(x) is x  # deferred: returned unreduced
        fused = group.take_deferred(x)
        slots.append(fused.target.slot)
        assert group.take_deferred(x) is None  # taken once
    assert slots == [0, 1, 0, 1] and summed == []
    big = torch.randn(65, 8)  # more rows than the fused kernel's programs: summed at once
    assert group.defer_sum(big) is big and summed == [(65, 8)] and group.take_deferred(big) is None
    x = torch.randn(1, 8)
    group.defer_sum(x)
    with pytest.raises(RuntimeError, match="other than the RMSNorm"):
        group.take_deferred(x * 2)  # a model must hand the sum straight to the norm
    assert comm.push_target(1, 8, torch.float32) is None  # pushed rows are 16-bit words


def test_rms_norm_computes_a_deferred_sum_in_the_fused_kernel(monkeypatch):
    """`RMSNorm`'s CUDA path: a deferred partial sum goes to the fused all-reduce + add + norm kernel
    with the slot it was given; anything else to the plain fused add + norm kernel."""
    import torch

    from layer_context import layers_for
    from tokenmill.distributed.parallel_state import TensorParallelGroup
    from tokenmill.model.layers.layernorm import RMSNorm

    comm = _fused_communicator(torch.float32)
    group = TensorParallelGroup(0, 2, torch.device("cpu"), communicator=comm)
    with layers_for("cpu", tp=group):
        norm = RMSNorm(8, 1e-6)
    calls = []
    norm._kernel = lambda x, w, eps, residual=None: calls.append(("plain", residual is not None)) or "plain"
    norm._fused_sum_kernel = lambda x, residual, *args: calls.append(("fused", args[4], args[-1])) or "fused"
    x, residual = torch.randn(2, 8), torch.randn(2, 8)
    group.defer_sum(x)
    assert RMSNorm.forward_cuda(norm, x, residual) == "fused"
    assert RMSNorm.forward_cuda(norm, torch.randn(2, 8), residual) == "plain"  # nothing deferred
    assert RMSNorm.forward_cuda(norm, x) == "plain"  # no residual: a plain norm
    assert calls == [("fused", 0, False), ("plain", True), ("plain", False)]
