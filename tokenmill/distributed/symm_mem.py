"""The symmetric-memory communicator: a one-shot all-reduce over NVLink peer memory for the small
sums of tensor-parallel decode, and the buffers of the fused all-reduce + RMSNorm kernel.

Batch-1 decode of Llama-3.1-70B at TP=2 sums a 16 KB activation 160 times per token. NCCL's ring
all-reduce costs ~15-20 us each at that size: latency, not bandwidth (docs/perf.md). PyTorch's
symmetric memory (`torch.distributed._symmetric_memory`) maps every rank's buffer into every other
rank's address space; its `one_shot_all_reduce` kernel has each rank read all peers' buffers
directly and sum them, one kernel and two barriers, no ring. It needs no NVLink multicast (which
the lent machines keep off), and it can be captured in a CUDA graph because the buffer is fixed.
Used for tensors up to `max_bytes` in the dtype the buffer was made for; anything else goes
through NCCL. `--disable-custom-all-reduce` turns it off; when symmetric memory cannot be set up
(no peer access, a torch without it) the engine logs why and keeps NCCL.

**Deferred sums.** A second buffer (two slots, a region per sender) serves
`ops/all_reduce_rms_norm.py`, the kernel that does a row-parallel layer's sum, the residual add and
the next RMSNorm in one launch. A row-parallel layer hands its partial output to `defer`; if the
fused kernel can take it (a decode batch of up to `MAX_FUSED_ROWS` rows), it is returned
unreduced and remembered, and the RMSNorm that receives it (`take_deferred`) runs the fused kernel.
Slots alternate from one deferred sum to the next, as that kernel's buffer reuse requires; every
forward pass makes an even number of them (attention's and the MLP's per layer), so a captured
CUDA graph replays with the alternation intact.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    from tokenmill.config.engine_config import KernelConfig

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 512 * 1024  # one-shot reads world_size copies: past this NCCL's ring wins
# The fused kernel's programs (one per row) spin on each other across GPUs, so all of them must be
# resident at once; 64 rows is far below one program per SM on any GPU this runs on.
MAX_FUSED_ROWS = 64
FUSED_NUM_SLOTS = 2  # the fused kernel's buffer slots, alternating (ops/all_reduce_rms_norm.py)

# Symmetric memory is set up at most once per process: a second tensor-parallel engine in the same
# process (rank 0 runs in the caller's) hung in the rendezvous (2x and 4x H200, torch 2.11), also on
# a freshly named group, so some per-process state of torch's symmetric memory does not survive a
# process group's end. This records that process-wide fact; that engine uses NCCL (logged).
_set_up_in_process = False


class PushTarget(NamedTuple):
    """Where a batch-1 GEMV sends its output row for the fused all-reduce + norm of `slot`
    (`ops/gemv.gemv(push=...)`): this rank's view of the fused kernel's buffers."""

    buffer_ptrs: torch.Tensor
    call_counters: torch.Tensor
    slot: int
    region_words: int
    rank: int
    world_size: int


class FusedSum(NamedTuple):
    """A deferred sum, as the RMSNorm that computes it needs it (`ops/all_reduce_rms_norm.py`)."""

    target: PushTarget
    pushed: bool  # the GEMV that made x already sent it to the peers


class SymmMemCommunicator:
    """`all_reduce_(x)` for small tensors, and the deferred sums of the fused all-reduce + norm."""

    def __init__(self, group_name: str, device: torch.device, dtype: torch.dtype,
                 max_bytes: int = DEFAULT_MAX_BYTES, fuse_norm: bool = True):
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
        self.fused_region_words = 0
        self._deferred: torch.Tensor | None = None  # the partial sum the next RMSNorm must take
        self._deferred_sum: FusedSum | None = None
        self._next_slot = 0
        if fuse_norm:
            self._init_fused(symm_mem, group_name, device, max_bytes)

    def _init_fused(self, symm_mem, group_name, device, max_bytes) -> None:
        # FUSED_NUM_SLOTS slots, each with a region per sending rank of 8-byte words that carry 4
        # bytes of data and a call number (ops/all_reduce_rms_norm.py). Zeroed before the
        # rendezvous, which no rank leaves before all have arrived, so no peer's first row can land
        # before the zeroing.
        region_words = max_bytes // 4
        self.fused_buffer = symm_mem.empty(FUSED_NUM_SLOTS * self.world_size * region_words, dtype=torch.int64,
                                           device=device)
        self.fused_buffer.zero_()
        torch.cuda.synchronize(device)
        handle = symm_mem.rendezvous(self.fused_buffer, group_name)  # collective
        if handle.buffer_ptrs[self.rank] != self.fused_buffer.data_ptr():
            raise RuntimeError("symmetric buffer pointer table does not start at the tensor")
        self.fused_handle = handle  # kept alive with the buffer it maps
        self.buffer_ptrs = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.call_counters = torch.zeros(FUSED_NUM_SLOTS, MAX_FUSED_ROWS, dtype=torch.int32, device=device)
        self.fused_region_words = region_words

    # ----- one-shot all-reduce -----
    def can_reduce(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.is_contiguous() and x.numel() <= self.max_numel

    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        shared = self.buffer[:flat.numel()]
        self._copy_out(shared, flat, "sum", self.group_name, out=flat)
        return x

    # ----- deferred sums -----
    @property
    def fuses_norm(self) -> bool:
        return self.fused_region_words > 0

    @property
    def has_deferred(self) -> bool:
        return self._deferred is not None

    @property
    def next_slot(self) -> int:
        """The slot the next deferred sum takes."""
        return self._next_slot

    def _can_fuse(self, rows: int, hidden: int, dtype: torch.dtype) -> bool:
        return (self.fuses_norm and dtype == self.dtype and rows <= MAX_FUSED_ROWS
                and rows * hidden * dtype.itemsize <= 4 * self.fused_region_words
                and (hidden * dtype.itemsize) % 16 == 0)

    def _target(self) -> PushTarget:
        return PushTarget(self.buffer_ptrs, self.call_counters, self._next_slot, self.fused_region_words,
                          self.rank, self.world_size)

    def push_target(self, rows: int, hidden: int, dtype: torch.dtype) -> PushTarget | None:
        """The target of the next deferred sum, for a GEMV to push its row to (2-byte dtypes only:
        the pushed words hold two elements each)."""
        if rows != 1 or dtype.itemsize != 2 or not self._can_fuse(rows, hidden, dtype):
            return None
        return self._target()

    def defer(self, x: torch.Tensor, pushed: bool) -> bool:
        """Remember `x` for the next RMSNorm if the fused kernel can sum it; False: sum it now."""
        if self._deferred is not None:
            raise RuntimeError("a deferred tensor-parallel sum was never taken by an RMSNorm")
        if not (x.dim() == 2 and x.is_contiguous() and self._can_fuse(x.shape[0], x.shape[1], x.dtype)):
            return False
        self._deferred, self._deferred_sum = x, FusedSum(self._target(), pushed)
        self._next_slot ^= 1
        return True

    def take_deferred(self, x: torch.Tensor) -> FusedSum | None:
        deferred = self._deferred
        if deferred is None:
            return None
        if deferred is not x:
            raise RuntimeError("a deferred tensor-parallel sum reached an op other than the RMSNorm "
                               "that follows it (a model must pass a row-parallel output straight to a norm)")
        fused, self._deferred, self._deferred_sum = self._deferred_sum, None, None
        return fused


def locally_supported(device: torch.device, world_size: int) -> bool:
    """What one rank can check alone before the collective set-up: CUDA, the ops in this torch
    build, and peer access to every other GPU of the group."""
    if device.type != "cuda":
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


def create_communicator(group, dtype: torch.dtype, kernels: "KernelConfig") -> SymmMemCommunicator | None:
    """The communicator for `group` (a `TensorParallelGroup` whose process group is up), if every
    rank can set it up (the ranks agree before and after the collective set-up, so either all use
    it or none does); None: every sum goes through NCCL."""
    global _set_up_in_process
    fresh = not _set_up_in_process
    if not fresh:
        logger.warning("symmetric memory was already set up once in this process: this engine's "
                       "all-reduces use NCCL (start one engine per process for the faster path)")
    if not group.all_reduce_min(int(fresh and locally_supported(group.device, group.world_size))):
        return None
    _set_up_in_process = True
    fuse_norm = kernels.fused_all_reduce_norm and group.world_size <= kernels.fused_all_reduce_max_world_size
    try:
        comm = SymmMemCommunicator(torch.distributed.group.WORLD.group_name, group.device, dtype,
                                   fuse_norm=fuse_norm)
    except Exception as exc:  # noqa: BLE001 - any failure here only costs speed
        logger.warning("symmetric-memory all-reduce unavailable, using NCCL for every all-reduce: %s", exc)
        comm = None
    if not group.all_reduce_min(int(comm is not None)):
        return None
    logger.info("all-reduces up to %d KiB use symmetric memory (one-shot)%s",
                comm.max_numel * dtype.itemsize // 1024,
                "; decode's sums fused with the next RMSNorm" if comm.fuses_norm else "")
    return comm
