"""Weights from a colocated process over CUDA IPC: checkpoint-engine's protocol, both sides.

checkpoint-engine (Moonshot's, which updates Kimi-K2 inside running vLLM engines) and vLLM's RLHF
examples hand each engine rank a ZMQ address, keyed by the rank's device UUID
(`device_uuid`). The rank connects a REP socket there and the sender (REQ) drives:

    sender                                   engine rank
    IPC handle of one uint8 device buffer -> rebuild the buffer on its own device, ack
    [{name, dtype, shape, offset}, ...]   -> views into the buffer, loaded, device synced, ack
    ... one list per bucket, the sender refilling the buffer between them ...
    None                                  -> finish the update, ack

Frames are pickled, because a torch CUDA IPC handle is a rebuild function and its arguments and
nothing else carries it: the only pickle in tokenmill, on a socket the caller names (an ipc://
path on this machine). Connect only to a sender you trust. On the CPU (tests) the buffer is a
shared-memory file mapped by name instead.

`IpcWeightSender` is the sender's side, for colocated trainers and the benchmarks.
"""

from __future__ import annotations

import gc
import logging
import traceback
from typing import Any, Callable, Iterable

import torch
import zmq

logger = logging.getLogger(__name__)

ALIGN_BYTES = 256  # each tensor starts on this boundary in the buffer (checkpoint-engine's)
# How long an engine rank waits for the sender's next message before giving the update up
# (checkpoint-engine's request timeout), so a sender that died does not hang the engine.
RECEIVE_TIMEOUT_S = 300.0
WeightBatch = list[tuple[str, torch.Tensor]]


def device_uuid(device: torch.device) -> str:
    """The key of a rank's address: "GPU-<uuid>" as checkpoint-engine and vLLM spell it; "cpu"."""
    if device.type != "cuda":
        return "cpu"
    return f"GPU-{torch.cuda.get_device_properties(device).uuid!s}"


# ----- handles -----
def share_tensor(tensor: torch.Tensor) -> tuple[Callable, tuple]:
    """(rebuild function, arguments) that give another process `tensor` itself (its memory, not a
    copy): torch's CUDA IPC handle; on the CPU, a shared-memory file opened by name."""
    if tensor.is_cuda:
        from torch.multiprocessing.reductions import reduce_tensor
        return reduce_tensor(tensor)
    if not tensor.is_shared():
        tensor.share_memory_()
    manager, handle, size = tensor.untyped_storage()._share_filename_cpu_()
    return rebuild_shared_cpu_tensor, (manager, handle, size, str(tensor.dtype).removeprefix("torch."),
                                       list(tensor.shape), list(tensor.stride()), tensor.storage_offset())


def rebuild_shared_cpu_tensor(manager: bytes, handle: bytes, size: int, dtype: str, shape: list[int],
                              stride: list[int], offset: int) -> torch.Tensor:
    storage = torch.UntypedStorage._new_shared_filename_cpu(manager, handle, size)
    return torch.empty(0, dtype=getattr(torch, dtype)).set_(storage, offset, shape, stride)


def open_shared(handle: tuple[Callable, tuple], device: torch.device) -> torch.Tensor:
    """The sender's tensor in this process; a CUDA handle is opened on `device` (the sender may
    number its GPUs differently, under another CUDA_VISIBLE_DEVICES)."""
    func, args = handle
    args = list(args)
    from torch.multiprocessing.reductions import rebuild_cuda_tensor
    if func is rebuild_cuda_tensor:
        # torch.device("cuda") has no index: the current device is the one this rank runs on.
        args[6] = device.index if device.index is not None else torch.cuda.current_device()  # storage_device
    return func(*args)


def tensors_in(buffer: torch.Tensor, metas: list[dict[str, Any]]) -> WeightBatch:
    """Views of the tensors a bucket's metadata places in `buffer` (uint8)."""
    out = []
    for meta in metas:
        dtype, shape = meta["dtype"], torch.Size(meta["shape"])
        nbytes = dtype.itemsize * shape.numel()
        offset = meta["offset"]
        out.append((meta["name"], buffer[offset:offset + nbytes].view(dtype).view(shape)))
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----- the engine rank's side -----
def receive_ipc_stream(context: zmq.Context, address: str, device: torch.device,
                       load: Callable[[WeightBatch], None], timeout_s: float = RECEIVE_TIMEOUT_S) -> int:
    """Serve one update from the sender at `address`: `load` each bucket (it must copy what it
    keeps: the sender overwrites the buffer after the ack). Returns the buckets received. A
    failing `load` is reported to the sender and raised here; `timeout_s` of silence from the
    sender raises TimeoutError."""
    sock = context.socket(zmq.REP)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.connect(address)
    buffer: torch.Tensor | None = None
    num_buckets = 0
    try:
        while True:
            try:
                payload = sock.recv_pyobj()
            except zmq.Again:
                raise TimeoutError(f"no message from the weight sender at {address} for {timeout_s:.0f} s") from None
            if payload is None:
                _synchronize(device)
                sock.send(b"")
                return num_buckets
            if isinstance(payload, tuple):
                buffer = open_shared(payload, device)
                sock.send(b"")
                continue
            if isinstance(payload, Exception):  # the sender gave up
                raise payload
            if buffer is None:
                raise RuntimeError("the sender sent tensors before its buffer's IPC handle")
            try:
                load(tensors_in(buffer, payload))
                _synchronize(device)
            except Exception as exc:
                sock.send_string("".join(traceback.format_exception(exc)))
                raise
            sock.send(b"")
            num_buckets += 1
    finally:
        sock.close()
        del buffer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


# ----- the sender's side -----
def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES


class _EngineFailed(RuntimeError):
    pass


class IpcWeightSender:
    """Sends named tensors to one engine rank through one shared buffer of `buffer_bytes`.

    Bind first (the address goes to the engine, e.g. in `update_weights_from_ipc`'s
    `{device_uuid: address}`), then `send` while the engine's call runs.
    """

    def __init__(self, address: str, device: torch.device, buffer_bytes: int) -> None:
        self.device = device
        self.buffer = torch.empty(buffer_bytes, dtype=torch.uint8, device=device)
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.REQ)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(address)

    def _request(self, payload: Any) -> None:
        self._sock.send_pyobj(payload)
        reply = self._sock.recv()
        if reply:
            raise _EngineFailed(f"the engine rank failed to load the weights:\n{reply.decode(errors='replace')}")

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Stream every tensor (bucket by bucket), then end the update. Returns the bytes sent.
        A failure here is passed on to the engine rank (which then fails its update too)."""
        self._request(share_tensor(self.buffer))
        try:
            return self._send_all(named_tensors)
        except Exception as exc:
            if not isinstance(exc, _EngineFailed):
                self._sock.send_pyobj(RuntimeError(f"the weight sender failed: {type(exc).__name__}: {exc}"))
            raise

    def _send_all(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        capacity = self.buffer.numel()
        metas: list[dict[str, Any]] = []
        offset = sent = 0
        for name, tensor in named_tensors:
            nbytes = tensor.numel() * tensor.element_size()
            if _aligned(nbytes) > capacity:
                raise ValueError(f"{name} ({nbytes} bytes) is larger than the {capacity}-byte buffer")
            if offset + nbytes > capacity:
                self._flush(metas)
                metas, offset = [], 0
            view = self.buffer[offset:offset + nbytes].view(tensor.dtype).view(tensor.shape)
            view.copy_(tensor)
            metas.append({"name": name, "dtype": tensor.dtype, "shape": list(tensor.shape), "offset": offset})
            offset += _aligned(nbytes)
            sent += nbytes
        if metas:
            self._flush(metas)
        self._request(None)
        return sent

    def _flush(self, metas: list[dict[str, Any]]) -> None:
        _synchronize(self.device)  # the copies are in the buffer before the engine reads it
        self._request(metas)

    def close(self) -> None:
        self._sock.close(linger=0)
        self._context.term()
