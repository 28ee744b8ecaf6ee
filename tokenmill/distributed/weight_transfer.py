"""Weights from a trainer to the engine over a torch.distributed group the two form on request.

The trainer is rank 0; the engine's tensor-parallel rank r joins as `rank_offset + r`. The group
is made with the recipe every RL framework uses for this (SGLang's and OpenRLHF's
`init_custom_process_group`, veRL's): a TCP rendezvous at `master_address:master_port` (rank 0
hosts the store), a store prefixed with the group's name, and a process group outside
`torch.distributed`'s default world, so it coexists with the engine's own tensor-parallel group
and a trainer using that recipe pairs with it. NCCL between GPUs, gloo on CPUs.

An update announces its tensors first (`TensorSpec`: name, dtype, shape), then rank 0 broadcasts
them one by one in that order; the engine receives them in buckets of at most `bucket_bytes`
(posting a bucket's receives together, loading it, freeing it), so a model larger than the free
memory streams through. `broadcast_weights` is the trainer's side.
"""

from __future__ import annotations

import datetime
from typing import Iterable, Iterator

import msgspec
import torch
import torch.distributed as dist

DEFAULT_GROUP_NAME = "weight_update_group"  # SGLang's default, so a trainer written for it pairs
DEFAULT_BUCKET_BYTES = 1 << 30


class TensorSpec(msgspec.Struct, array_like=True, frozen=True):
    """A tensor announced before its bytes: HF name, dtype name ("bfloat16"), shape."""

    name: str
    dtype: str
    shape: list[int]

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorSpec":
        return cls(name, dtype_name(tensor.dtype), list(tensor.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for size in self.shape:
            numel *= size
        return numel * self.torch_dtype.itemsize


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str) -> torch.dtype:
    """"bfloat16" or "torch.bfloat16" -> torch.bfloat16; anything else is a ValueError."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def specs_from(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> list[TensorSpec]:
    """SGLang's `update_weights_from_distributed(names, dtypes, shapes)` as specs, checked."""
    if not (len(names) == len(dtypes) == len(shapes)):
        raise ValueError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    specs = [TensorSpec(n, dtype_name(parse_dtype(str(d))), [int(s) for s in shape])
             for n, d, shape in zip(names, dtypes, shapes)]
    for spec in specs:
        if any(size < 0 for size in spec.shape):
            raise ValueError(f"{spec.name}: negative size in shape {spec.shape}")
    return specs


def buckets(specs: list[TensorSpec], bucket_bytes: int) -> Iterator[list[TensorSpec]]:
    """Consecutive runs of `specs` of at most `bucket_bytes` each (a larger tensor alone)."""
    bucket: list[TensorSpec] = []
    size = 0
    for spec in specs:
        if bucket and size + spec.nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append(spec)
        size += spec.nbytes
    if bucket:
        yield bucket


def init_custom_process_group(backend: str, init_method: str, world_size: int, rank: int,
                              group_name: str, timeout_s: float = 600.0) -> dist.ProcessGroup:
    """A process group of `world_size` ranks rendezvousing at `init_method` ("tcp://host:port"),
    outside the default world (private torch API, as every RL framework's copy of this recipe)."""
    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = datetime.timedelta(seconds=timeout_s)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, backend_options=None, timeout=timeout)
    # Group ranks are the ranks given here (torch.distributed's collectives translate through this).
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def receive_broadcast(group: dist.ProcessGroup, specs: list[TensorSpec], device: torch.device,
                      bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Receive rank 0's broadcast of `specs` (in order) on `device`, one bucket at a time; each
    bucket's tensors are valid until the next bucket is asked for."""
    for bucket in buckets(specs, bucket_bytes):
        tensors = [torch.empty(spec.shape, dtype=spec.torch_dtype, device=device) for spec in bucket]
        works = [dist.broadcast(t, src=0, group=group, async_op=True) for t in tensors]
        for work in works:
            work.wait()
        yield [(spec.name, t) for spec, t in zip(bucket, tensors)]
        del tensors


def broadcast_weights(group: dist.ProcessGroup, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """The trainer's side (rank 0): broadcast each tensor, in the order its spec was announced."""
    for _, tensor in named_tensors:
        dist.broadcast(tensor.contiguous(), src=0, group=group)


def destroy_group(group: dist.ProcessGroup) -> None:
    dist.destroy_process_group(group)
