"""A tensor-parallel group: who this rank is, and the collectives the layers call.

One `TensorParallelGroup` per engine, made by the worker before the model is built and handed to
every layer when it is built (`model/build_context.py`); nothing about parallelism lives in module
globals. With one rank every collective is a no-op.

On GPUs the group may also hold a `SymmMemCommunicator` (`symm_mem.py`): small sums then go
through symmetric memory in one shot, and a row-parallel layer's sum may be *deferred* to the
RMSNorm that follows it, which does the sum, the residual add and the norm in one kernel
(`defer_sum` / `take_deferred`; the layers in `model/layers/` apply it, the model files never see it).
"""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from tokenmill.config.engine_config import KernelConfig
    from tokenmill.distributed.symm_mem import PushTarget, SymmMemCommunicator

logger = logging.getLogger(__name__)


class TensorParallelGroup:
    """Rank `rank` of `world_size`; `process_group` None means the default (WORLD) group."""

    def __init__(self, rank: int, world_size: int, device: torch.device, owns_process_group: bool = False,
                 communicator: "SymmMemCommunicator | None" = None) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.communicator = communicator
        self._owns_process_group = owns_process_group

    @classmethod
    def single(cls, device: torch.device) -> "TensorParallelGroup":
        return cls(0, 1, device)

    @property
    def is_driver(self) -> bool:
        """Rank 0: the rank that samples and talks to the engine."""
        return self.rank == 0

    # ----- collectives -----
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum `x` over the ranks, in place (small CUDA tensors: one-shot over symmetric memory;
        otherwise NCCL on GPUs, gloo on CPUs)."""
        if self.world_size == 1:
            return x
        comm = self.communicator
        if comm is not None and comm.can_reduce(x):
            return comm.all_reduce_(x)
        torch.distributed.all_reduce(x)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's `x` along the last dimension (one all-gather)."""
        if self.world_size == 1:
            return x
        shape = x.shape
        x = x.contiguous().view(1, -1, x.shape[-1])  # [1, rows, width]
        out = torch.empty((self.world_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        # torch >= 2.13 names it all_gather_single; older releases all_gather_into_tensor.
        gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor
        gather(out, x)  # [tp, rows, width]
        gathered = out.transpose(0, 1).reshape(x.shape[1], self.world_size * x.shape[2])
        return gathered.view(*shape[:-1], self.world_size * shape[-1])

    def all_reduce_min(self, value: int) -> int:
        """The smallest of every rank's `value` (used to agree on one KV-pool size)."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())

    def broadcast_from_driver(self, x: torch.Tensor) -> None:
        """Overwrite every rank's `x` with rank 0's, in place."""
        if self.world_size > 1:
            torch.distributed.broadcast(x, src=0)

    # ----- a row-parallel sum fused into the next RMSNorm -----
    def push_target(self, rows: int, hidden: int, dtype: torch.dtype) -> "PushTarget | None":
        """Where a batch-1 GEMV whose output will be a deferred sum may send that output to the
        peers itself (`ops/gemv.py`), or None. Only where `defer_sum` is certain to defer it."""
        comm = self.communicator
        return None if comm is None else comm.push_target(rows, hidden, dtype)

    def defer_sum(self, x: torch.Tensor, pushed: bool = False) -> torch.Tensor:
        """The sum over ranks of `x`, a row-parallel layer's partial output: returned unreduced if
        the next RMSNorm will sum it in its own kernel (`take_deferred`), else all-reduced now.
        `pushed`: a GEMV already sent `x` to the peers (`push_target`)."""
        comm = self.communicator
        if comm is not None and comm.defer(x, pushed):
            return x
        assert not pushed, "a pushed row must be summed by the fused kernel"
        return self.all_reduce(x)

    def take_deferred(self, x: torch.Tensor):
        """For the RMSNorm receiving `x`: the `FusedSum` to compute it with if `x` is a deferred
        partial sum, else None. Raises if a deferred sum reached anything but the next norm."""
        comm = self.communicator
        return None if comm is None else comm.take_deferred(x)

    def check_all_sums_taken(self) -> None:
        """After a forward pass: every deferred sum was computed by its norm (a model whose
        row-parallel output reaches something else fails here, at its first step, not silently)."""
        comm = self.communicator
        if comm is not None and comm.has_deferred:
            raise RuntimeError("a deferred tensor-parallel sum was never taken by an RMSNorm")

    # ----- life cycle -----
    def destroy(self) -> None:
        """Leave the process group (so a later engine in this process can start a new one)."""
        used_symm_mem, self.communicator = self.communicator is not None, None
        if not self._owns_process_group:
            return
        self._owns_process_group = False
        import torch.distributed as dist
        from torch.distributed.distributed_c10d import _abort_process_group

        if not dist.is_initialized():
            return
        try:
            if used_symm_mem:
                # NCCL's orderly shutdown never returned once symmetric memory had been mapped
                # (2x H200, torch 2.11). Every rank is stopping here with nothing in flight, so
                # aborting the communicators loses nothing; it also forgets the group.
                torch.cuda.synchronize()
                _abort_process_group()
            else:
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer can make teardown fail; nothing to save
            logger.warning("process group teardown failed", exc_info=True)


def init_tensor_parallel(rank: int, world_size: int, device: torch.device, store_path: str,
                         kernels: "KernelConfig", dtype: torch.dtype, timeout_s: float = 600.0
                         ) -> TensorParallelGroup:
    """Join the ranks' process group: NCCL on GPUs, gloo on CPUs, rendezvous through a file store.
    On GPUs, also set up the symmetric-memory communicator for `dtype` (the model's) where
    `kernels` allows it and every rank can."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process (another "
                           "tensor-parallel engine?): call its LLM.shutdown() (or use `with LLM(...)`) "
                           "before starting another")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    group = TensorParallelGroup(rank, world_size, device, owns_process_group=True)
    logger.info("rank %d of %d joined the tensor-parallel group (%s)", rank, world_size, backend)
    if device.type == "cuda" and kernels.custom_all_reduce:
        from tokenmill.distributed.symm_mem import create_communicator
        group.communicator = create_communicator(group, dtype, kernels)
    return group
