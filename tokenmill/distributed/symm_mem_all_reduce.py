"""A one-shot all-reduce over NVLink peer memory for the small sums of tensor-parallel decode.

Batch-1 decode of Llama-3.1-70B at TP=2 sums a 16 KB activation 160 times per token. NCCL's ring
all-reduce costs ~15-20 us each at that size: latency, not bandwidth (docs/perf.md). PyTorch's
symmetric memory (`torch.distributed._symmetric_memory`) maps every rank's buffer into every other
rank's address space; its `one_shot_all_reduce` kernel has each rank read all peers' buffers
directly and sum them, one kernel and two barriers, no ring. It needs no NVLink multicast (which
the lent machines keep off), and it can be captured in a CUDA graph because the buffer is fixed.

Used for tensors up to `max_bytes` in the dtype the buffer was made for; anything else goes
through NCCL. Off with `TOKENMILL_SYMM_MEM_ALL_REDUCE=0`; when symmetric memory cannot be set up
(no peer access, a torch without it) the engine logs why and keeps NCCL.

The same object also owns a second buffer (three slots, a region per sender) for
`all_reduce_rms_norm.py`, the kernel that does a row-parallel sum, the residual add and the next
RMSNorm in one launch (decode batches of up to `MAX_FUSED_ROWS` rows; off alone with
`TOKENMILL_FUSED_ALL_REDUCE_NORM=0`).
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024  # one-shot reads world_size copies: past this NCCL's ring wins
# The fused kernel's programs (one per row) spin on each other across GPUs, so all of them must be
# resident at once; 64 rows is far below one program per SM on any GPU this runs on.
MAX_FUSED_ROWS = 64
# Measured on H200s (docs/perf.md): at TP=2 the fused kernel beats the one-shot sum + separate
# norm (3.9-7.3 vs 8.3-13.5 us); at TP=4 the pushed kernel wins at decode's batch-1 shapes (5.6 vs
# 8.8 us at 1 x 4096, 8.1 vs 9.5 at 1 x 8192) and took Llama-3.1-70B from 11.53 to 10.73 ms/token,
# with 64-request throughput unchanged. Eight ranks have not been measured (no 8-GPU machine lent).
FUSED_MAX_WORLD_SIZE = 4


def fused_max_world_size() -> int:
    """FUSED_MAX_WORLD_SIZE, or `TOKENMILL_FUSED_MAX_WORLD_SIZE` (to time the fused kernel on more GPUs)."""
    return int(os.environ.get("TOKENMILL_FUSED_MAX_WORLD_SIZE", FUSED_MAX_WORLD_SIZE))


class PushTarget(NamedTuple):
    """Where a batch-1 GEMV sends its output row for the fused all-reduce + norm of `slot`
    (`triton_gemv.gemv(push=...)`): this rank's view of the fused kernel's buffers."""

    buffer_ptrs: torch.Tensor
    call_counters: torch.Tensor
    slot: int
    region_words: int
    rank: int
    world_size: int


def enabled_by_env() -> bool:
    return os.environ.get("TOKENMILL_SYMM_MEM_ALL_REDUCE", "1") != "0"


def fused_norm_enabled_by_env() -> bool:
    return os.environ.get("TOKENMILL_FUSED_ALL_REDUCE_NORM", "1") != "0"


class SymmMemAllReduce:
    """`all_reduce_(x)`: sum x over the group in place, if `can_reduce(x)`; and
    `all_reduce_add_rms_norm(...)`, if `can_fuse(x)`."""

    def __init__(self, group_name: str, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES, fuse_norm: bool | None = None):
        """`fuse_norm`: also set up the fused all-reduce + add + RMSNorm kernel; None follows the
        switch and `fused_max_world_size()` (the benchmark script forces it to time it anywhere)."""
        import torch.distributed._symmetric_memory as symm_mem

        enable = getattr(symm_mem, "enable_symm_mem_for_group", None)
        if enable is not None:  # needed by older releases; deprecated (still registers the store) in newer
            enable(group_name)
        self.group_name = group_name
        self.dtype = dtype
        self.max_numel = max_bytes // dtype.itemsize
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group_name)  # collective: every rank calls it
        # Copies the local input into the shared buffer inside the kernel, then sums every rank's.
        self._copy_out = torch.ops.symm_mem.one_shot_all_reduce_copy_out
        self.rank, self.world_size = self.handle.rank, self.handle.world_size
        self.fused_region_words = self.max_fused_rows = 0
        if fuse_norm is None:
            fuse_norm = fused_norm_enabled_by_env() and self.world_size <= fused_max_world_size()
        if fuse_norm:
            self._init_fused(symm_mem, group_name, device, dtype, max_bytes)

    def _init_fused(self, symm_mem, group_name, device, dtype, max_bytes) -> None:
        # NUM_SLOTS slots, each with a region per sending rank of 8-byte words that carry 4 bytes
        # of data and a call number (all_reduce_rms_norm.py). Zeroed before the rendezvous, which
        # no rank leaves before all have arrived, so no peer's first row can land before the zeroing.
        from tokenmill.distributed.all_reduce_rms_norm import NUM_SLOTS, all_reduce_add_rms_norm

        region_words = max_bytes // 4
        self.fused_buffer = symm_mem.empty(NUM_SLOTS * self.world_size * region_words, dtype=torch.int64,
                                           device=device)
        self.fused_buffer.zero_()
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(self.fused_buffer, group_name)  # collective
        if handle.buffer_ptrs[self.rank] != self.fused_buffer.data_ptr():
            raise RuntimeError("symmetric buffer pointer table does not start at the tensor")
        self.fused_handle = handle  # kept alive with the buffer it maps
        self._fused = all_reduce_add_rms_norm
        self.buffer_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.call_counters = torch.zeros(NUM_SLOTS, MAX_FUSED_ROWS, dtype=torch.int32, device=device)
        self.max_fused_rows = MAX_FUSED_ROWS
        self.fused_region_words = region_words

    def can_reduce(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.max_numel

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        shared = self.buffer[:flat.numel()]
        self._copy_out(shared, flat, "sum", self.group_name, out=flat)
        return x

    def can_fuse(self, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
        return (x.dim() == 2 and x.is_contiguous() and self.can_fuse_rows(x.shape[0], x.shape[1], x.dtype)
                and (residual is None or (residual.is_contiguous() and residual.shape == x.shape)))

    def can_fuse_rows(self, rows: int, hidden: int, dtype: torch.dtype) -> bool:
        return (self.fused_region_words > 0 and dtype == self.dtype and rows <= self.max_fused_rows
                and rows * hidden * dtype.itemsize <= 4 * self.fused_region_words
                and (hidden * dtype.itemsize) % 16 == 0)

    def push_target(self, slot: int) -> PushTarget:
        return PushTarget(self.buffer_ptrs, self.call_counters, slot, self.fused_region_words, self.rank,
                          self.world_size)

    def all_reduce_add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                                eps: float, slot: int, pushed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return self._fused(x, residual, weight, eps, self.buffer_ptrs, self.call_counters, slot,
                           self.fused_region_words, self.rank, self.world_size, pushed)


def locally_supported(device: torch.device, world_size: int) -> bool:
    """What one rank can check alone before the collective set-up: CUDA, the switch, the ops in
    this torch build, and peer access to every other GPU of the group."""
    if device.type != "cuda" or not enabled_by_env():
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
        torch.ops.symm_mem.one_shot_all_reduce_copy_out  # noqa: B018 - raises if this build lacks it
    except (ImportError, AttributeError, RuntimeError) as exc:
        logger.info("symmetric-memory all-reduce not in this torch build: %s", exc)
        return False
    me = device.index if device.index is not None else torch.cuda.current_device()
    peers = [d for d in range(min(world_size, torch.cuda.device_count())) if d != me]
    return all(torch.cuda.can_device_access_peer(me, d) for d in peers)


def try_create(group_name: str, device: torch.device, dtype: torch.dtype) -> SymmMemAllReduce | None:
    """The one-shot all-reduce, or None when its collective set-up fails on this rank (the caller
    agrees with the other ranks before anyone uses it)."""
    try:
        return SymmMemAllReduce(group_name, device, dtype)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
        logger.warning("symmetric-memory all-reduce unavailable, using NCCL for every all-reduce: %s", exc)
        return None
