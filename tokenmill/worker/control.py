"""Calls that every rank's `Worker` runs between steps: sleep and wake, weight updates, extension
methods (`Worker.handle`). The executor runs one on rank 0 in its own process and sends it, as the
same msgspec struct, to the other ranks (`executor/messages.py`), so each is typed on the wire.

Where a call's data is in the caller's process (tensors, pickled IPC handles), rank 0 gets it as a
side argument, and the struct tells the other ranks how to get theirs (a broadcast from rank 0 over
the tensor-parallel group, or the bytes in the struct).
"""

from __future__ import annotations

from typing import Union

import msgspec

from tokenmill.distributed.weight_transfer import TensorSpec

SLEEP_TAGS = ("weights", "kv_cache")


class Sleep(msgspec.Struct, tag="sleep"):
    """Level 1: weights to (pinned) host memory, KV cache dropped; level 2: both dropped."""

    level: int


class WakeUp(msgspec.Struct, tag="wake_up"):
    tags: list[str]  # of SLEEP_TAGS


class LoadWeightsFromDisk(msgspec.Struct, tag="load_disk"):
    """A safetensors folder (or a GGUF file) with the model's HF tensor names."""

    path: str


class LoadWeightsFromDriver(msgspec.Struct, tag="load_driver"):
    """Rank 0 holds the tensors in-process and broadcasts them over the tensor-parallel group."""

    specs: list[TensorSpec]
    bucket_bytes: int


class LoadWeightsFromIpcHandles(msgspec.Struct, tag="load_ipc_handles"):
    """`{device_uuid: [(name, torch IPC handle), ...]}`, pickled: a torch IPC handle is a rebuild
    function and its arguments, which only pickle carries (distributed/ipc_weights.py)."""

    handles_pickle: bytes


class LoadWeightsFromIpcStream(msgspec.Struct, tag="load_ipc_stream"):
    """checkpoint-engine's protocol: each rank serves the sender at its device's ZMQ address."""

    zmq_handles: dict[str, str]


class JoinUpdateGroup(msgspec.Struct, tag="join_group"):
    """Form a process group with a trainer (rank 0); tensor-parallel rank r is `rank_offset + r`."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str  # "nccl" or "gloo"


class LoadWeightsFromGroup(msgspec.Struct, tag="load_group"):
    specs: list[TensorSpec]
    group_name: str
    bucket_bytes: int


class LeaveUpdateGroup(msgspec.Struct, tag="leave_group"):
    group_name: str


class ExtensionCall(msgspec.Struct, tag="rpc"):
    """`collective_rpc`: a public method of the worker (or its `worker_extension_cls`), with
    msgpack-encoded `[args, kwargs]`; its result travels back msgpack-encoded."""

    method: str
    payload: bytes


WorkerCall = Union[Sleep, WakeUp, LoadWeightsFromDisk, LoadWeightsFromDriver, LoadWeightsFromIpcHandles,
                   LoadWeightsFromIpcStream, JoinUpdateGroup, LoadWeightsFromGroup, LeaveUpdateGroup,
                   ExtensionCall]
WORKER_CALL_TYPES = WorkerCall.__args__

# Calls that change the weights: the engine drops its prefix cache after each.
WEIGHT_UPDATES = (LoadWeightsFromDisk, LoadWeightsFromDriver, LoadWeightsFromIpcHandles, LoadWeightsFromIpcStream,
                  LoadWeightsFromGroup)
