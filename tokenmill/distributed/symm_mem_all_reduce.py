"""A low-latency all-reduce for small tensors on NVLink-connected GPUs, over PyTorch symmetric memory.

Batch-1 decode of Llama-3.1-70B at TP=2 makes 160 all-reduces of 16 KB per token. NCCL's ring takes
~25 us for each (its latency, not bandwidth, dominates), which adds ~4 ms to a ~17 ms token. Here
every rank copies its partial sums into a buffer that all ranks can read (symmetric memory), and
each rank sums the peers' buffers directly over NVLink ("one-shot"; "two-shot" reduce-scatter +
all-gather for mid sizes). Both are single kernels, so CUDA graphs capture them.

Only point-to-point loads are used: no NVLink multicast (KINDS.md: multicast stays off).
Larger tensors (prefill) go to NCCL, which is better at bandwidth.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

BUFFER_BYTES = 8 << 20  # covers decode batches up to 512 tokens of hidden size 8192 in bf16
ONE_SHOT_MAX_BYTES = 512 << 10


class SymmMemAllReduce:
    def __init__(self, group_name: str, device: torch.device, dtype: torch.dtype, world_size: int) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:
            enable(group_name)
        self.group_name = group_name
        self.dtype = dtype
        self.world_size = world_size
        self.buffer = symm_mem.empty(BUFFER_BYTES // dtype.itemsize, dtype=dtype, device=device)
        symm_mem.rendezvous(self.buffer, group_name)

    def can_run(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return x.dtype == self.dtype and x.is_cuda and nbytes <= BUFFER_BYTES and nbytes % 16 == 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        staged = self.buffer[:n]
        staged.copy_(x.view(-1))
        if n * x.element_size() <= ONE_SHOT_MAX_BYTES:
            out = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
        else:
            out = torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group_name)
            out = out.clone()  # the buffer is reused by the next call
        return out.view(x.shape)


def try_symm_mem_all_reduce(group_name: str, device: torch.device, dtype: torch.dtype, world_size: int,
                            nccl_all_reduce, first_in_process: bool = True) -> SymmMemAllReduce | None:
    """Set up the symmetric-memory path and check it against NCCL; every rank agrees to use it or not
    (a rank whose process already used it once votes no: see parallel_state)."""
    # Vote first: the set-up below is itself collective, so either every rank runs it or none.
    first = torch.tensor([int(first_in_process)], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
    if not first.item():
        logger.info("symmetric memory was already set up in a rank's process; small all-reduces use NCCL")
        return None
    impl, ok = None, 1
    try:
        impl = SymmMemAllReduce(group_name, device, dtype, world_size)
        rank = torch.distributed.get_rank()
        for numel in (8, 4096, 300_000):  # one-shot and two-shot sizes
            x = torch.arange(numel, device=device, dtype=torch.float32).to(dtype) * 0 + (rank + 1)
            expected = nccl_all_reduce(x.clone())
            got = impl(x)
            if not torch.equal(got, expected):
                ok = 0
    except Exception as exc:  # noqa: BLE001 - any failure: stay on NCCL
        logger.info("symmetric-memory all-reduce unavailable (%s: %s); using NCCL", type(exc).__name__, exc)
        ok = 0
    flag = torch.tensor([ok], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    if not flag.item():
        return None
    logger.info("small all-reduces use symmetric memory (one-shot up to %d KB, two-shot up to %d MB)",
                ONE_SHOT_MAX_BYTES >> 10, BUFFER_BYTES >> 20)
    return impl
