"""Tensor-parallel group state: rank, world size and the collectives the layers call.

Layers shard their weights by `tp_rank()` / `tp_world_size()` when they are built, and call
`tp_all_reduce` / `tp_all_gather_last_dim` in forward. With one rank every collective is a no-op.
The multi-process executor (`distributed/executor.py`, `distributed/worker.py`) calls
`init_tensor_parallel` in every rank's process before the model is built.

The state is per process: one tensor-parallel engine per process at a time.
"""

from __future__ import annotations

import datetime
import logging

import torch

logger = logging.getLogger(__name__)

_TP_RANK = 0
_TP_SIZE = 1
_TP_GROUP = None
_OWNS_PROCESS_GROUP = False
_SYMM_MEM = None  # SymmMemAllReduce for small CUDA sums, when every rank could set it up
_SYMM_MEM_SET_UP_IN_PROCESS = False  # see _init_symm_mem_all_reduce


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, store_path: str,
                         timeout_s: float = 600.0, dtype: torch.dtype | None = None) -> None:
    """Join the ranks' process group: NCCL on GPUs, gloo on CPUs, rendezvous through a file store.
    On GPUs, also set up the one-shot symmetric-memory all-reduce for `dtype` (the model's)."""
    global _OWNS_PROCESS_GROUP
    import torch.distributed as dist

    if _TP_SIZE != 1:
        raise RuntimeError("a tensor-parallel engine already runs in this process; call its "
                           "LLM.shutdown() (or use `with LLM(...)`) before starting another")
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; tokenmill's "
                           "tensor parallelism needs its own process group")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _OWNS_PROCESS_GROUP = True
    set_tensor_parallel(rank, world_size, None)
    logger.info("rank %d of %d joined the tensor-parallel group (%s)", rank, world_size, backend)
    if dtype is not None:
        _init_symm_mem_all_reduce(device, dtype)


def _init_symm_mem_all_reduce(device: torch.device, dtype: torch.dtype) -> None:
    """Every rank uses it or none does: the ranks agree before and after the collective set-up.

    Only the first tensor-parallel engine of a process gets it. A second engine in the same
    process (rank 0 runs in the caller's) hung in the symmetric-memory rendezvous (2x and 4x
    H200, torch 2.11), also on a freshly named group, so some per-process state of torch's
    symmetric memory does not survive a process group's end; that engine uses NCCL (logged).
    """
    global _SYMM_MEM, _SYMM_MEM_SET_UP_IN_PROCESS
    from tokenmill.distributed import symm_mem_all_reduce as sm

    if device.type != "cuda":
        return
    fresh = not _SYMM_MEM_SET_UP_IN_PROCESS
    if not fresh:
        logger.warning("symmetric memory was already set up once in this process: this engine's "
                       "all-reduces use NCCL (start one engine per process for the faster path)")
    if not tp_all_reduce_min(int(fresh and sm.locally_supported(device, _TP_SIZE)), device):
        return
    _SYMM_MEM_SET_UP_IN_PROCESS = True
    comm = sm.try_create(torch.distributed.group.WORLD.group_name, device, dtype)
    if tp_all_reduce_min(int(comm is not None), device):
        _SYMM_MEM = comm
        logger.info("all-reduces up to %d KiB use symmetric memory (one-shot)", comm.max_numel * dtype.itemsize // 1024)


def destroy_tensor_parallel() -> None:
    """Leave the process group (so a later engine in this process can start a new one)."""
    global _OWNS_PROCESS_GROUP, _SYMM_MEM
    set_tensor_parallel(0, 1, None)
    used_symm_mem, _SYMM_MEM = _SYMM_MEM is not None, None
    if _OWNS_PROCESS_GROUP:
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _abort_process_group

        _OWNS_PROCESS_GROUP = False
        if dist.is_initialized():
            try:
                if used_symm_mem:
                    # NCCL's orderly shutdown never returned once symmetric memory had been mapped
                    # (2x H200, torch 2.11). Every rank is stopping here with nothing in flight,
                    # so aborting the communicators loses nothing; it also forgets the group, so
                    # a later engine in this process can start a new one.
                    torch.cuda.synchronize()
                    _abort_process_group()
                else:
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a dead peer can make teardown fail; nothing to save
                logger.warning("process group teardown failed", exc_info=True)


def set_tensor_parallel(rank: int, world_size: int, group=None) -> None:
    global _TP_RANK, _TP_SIZE, _TP_GROUP
    _TP_RANK, _TP_SIZE, _TP_GROUP = rank, world_size, group


def tp_rank() -> int:
    return _TP_RANK


def tp_world_size() -> int:
    return _TP_SIZE


def symm_mem_set_up_in_process() -> bool:
    """Whether an engine in this process has set up symmetric memory (later ones use NCCL)."""
    return _SYMM_MEM_SET_UP_IN_PROCESS


def symm_mem_all_reduce_active() -> bool:
    """Whether this rank's small all-reduces go through symmetric memory (docs/scale-out.md)."""
    return _SYMM_MEM is not None


def fused_all_reduce_norm_active() -> bool:
    """Whether decode's all-reduces are fused with the following add + RMSNorm (`RMSNorm.reduce_add`)."""
    return _SYMM_MEM is not None and _SYMM_MEM.fused_region_words > 0


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the ranks, in place (small CUDA tensors: one-shot over symmetric memory;
    otherwise NCCL on GPUs, gloo on CPUs)."""
    if _TP_SIZE == 1:
        return x
    if _SYMM_MEM is not None and _SYMM_MEM.can_reduce(x):
        return _SYMM_MEM.all_reduce_(x)
    torch.distributed.all_reduce(x, group=_TP_GROUP)
    return x


# Slots of the fused kernel's buffers (`all_reduce_rms_norm.py`, "Buffer reuse"): decode's norms
# alternate slots 0 and 1; the embeddings' sum, once per forward pass, has a slot of its own.
FUSED_NUM_SLOTS = 3
EMBEDDING_SLOT = 2


def tp_all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                               slot: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The sum over ranks of `x`, plus `residual` (if any), normalised, in one kernel
    (`all_reduce_rms_norm.py`): (normed, new residual), or None where that kernel does not apply
    (one rank, no symmetric memory, too many rows) and the caller must do the three steps itself.
    `slot` (0 or 1) must alternate between consecutive calls; the embeddings' sum uses slot 2."""
    pushed = _PUSHED.pop(slot, None) is x
    if _TP_SIZE == 1 or _SYMM_MEM is None or not _SYMM_MEM.can_fuse(x, residual):
        assert not pushed, "a pushed row must be summed by the fused kernel"
        return None
    return _SYMM_MEM.all_reduce_add_rms_norm(x, residual, weight, eps, slot, pushed)


# slot -> the GEMV output whose row was already sent to the peers for that slot's next fused sum
# (`tp_push_target`). Set while a graph is captured (or an eager step runs), read by the norm that
# follows; the identity check means only that very tensor is taken as sent.
_PUSHED: dict[int, torch.Tensor] = {}


def tp_push_target(slot: int, rows: int, hidden: int, dtype: torch.dtype):
    """Where a batch-1 GEMV whose output the fused all-reduce + norm of `slot` will sum may send
    that output itself (`triton_gemv.gemv(push=...)`), or None: only where that fused call is
    certain to run, so that no sent row is left unsummed. The GEMV's caller then reports the
    output with `tp_note_pushed`."""
    if (_TP_SIZE == 1 or _SYMM_MEM is None or slot == EMBEDDING_SLOT or dtype.itemsize != 2
            or not _SYMM_MEM.can_fuse_rows(rows, hidden, dtype)):
        return None
    return _SYMM_MEM.push_target(slot)


def tp_note_pushed(slot: int, output: torch.Tensor) -> None:
    _PUSHED[slot] = output


def tp_all_reduce_min(value: int, device: torch.device) -> int:
    """The smallest of every rank's `value` (used to agree on one KV-pool size)."""
    if _TP_SIZE == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=_TP_GROUP)
    return int(t.item())


def tp_broadcast_from_driver(x: torch.Tensor) -> None:
    """Overwrite every rank's `x` with rank 0's (in place; the sampled tokens under async scheduling)."""
    if _TP_SIZE == 1:
        return
    torch.distributed.broadcast(x, src=0, group=_TP_GROUP)


def _all_gather_single(out: torch.Tensor, x: torch.Tensor, group) -> None:
    # torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
    fn = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
    fn(out, x, group=group)


def tp_all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's `x` along the last dimension (one all-gather)."""
    if _TP_SIZE == 1:
        return x
    shape = x.shape
    x = x.contiguous().view(1, -1, x.shape[-1])  # [1, rows, width]
    out = torch.empty((_TP_SIZE * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=_TP_GROUP)  # [tp, rows, width]
    gathered = out.transpose(0, 1).reshape(x.shape[1], _TP_SIZE * x.shape[2])
    return gathered.view(*shape[:-1], _TP_SIZE * shape[-1])
