"""The server's RL calls (docs/rl.md): typed messages to the engine-core process, what the core does
with them, and the API process's side (`RolloutControl`, `AdmissionGate`).

    route -> RolloutControl -> ControlRequest (msgspec, ZMQ) -> core busy loop: run_control(engine, op)
          <- ControlReply (by call id; outputs of aborted requests go out first, as a step's)

The core runs a call between two steps; while it runs (a weight update may wait for a trainer)
no step runs. New requests meet the `AdmissionGate` while the engine is paused or asleep: they
wait until it opens (the default) or are refused at once (`--requests-while-paused reject`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import TYPE_CHECKING, Any, Protocol, Union

import msgspec

from tokenmill.core.messages import EngineOutput
from tokenmill.distributed.weight_transfer import DEFAULT_BUCKET_BYTES, TensorSpec

if TYPE_CHECKING:
    from tokenmill.engine.engine_core import EngineCore

logger = logging.getLogger(__name__)

PAUSE_MODES = ("abort", "wait", "keep")
INFLIGHT_POLL_S = 0.02


# ----- client -> core -----
class SleepOp(msgspec.Struct, tag="sleep"):
    level: int


class WakeUpOp(msgspec.Struct, tag="wake_up"):
    tags: list[str] | None


class IsSleepingOp(msgspec.Struct, tag="is_sleeping"):
    pass


class PauseOp(msgspec.Struct, tag="pause"):
    abort: bool  # abort every unfinished request (their outputs end with finish_reason "abort")


class ResumeOp(msgspec.Struct, tag="resume"):
    pass


class ResetPrefixCacheOp(msgspec.Struct, tag="reset_prefix_cache"):
    pass


class UpdateFromDiskOp(msgspec.Struct, tag="update_from_disk"):
    path: str


class InitUpdateGroupOp(msgspec.Struct, tag="init_group"):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str
    backend: str | None


class UpdateFromDistributedOp(msgspec.Struct, tag="update_from_group"):
    specs: list[TensorSpec]
    group_name: str
    bucket_bytes: int = DEFAULT_BUCKET_BYTES


class DestroyUpdateGroupOp(msgspec.Struct, tag="destroy_group"):
    group_name: str


class CollectiveRpcOp(msgspec.Struct, tag="rpc"):
    method: str
    payload: bytes  # msgpack [args, kwargs]


ControlOp = Union[SleepOp, WakeUpOp, IsSleepingOp, PauseOp, ResumeOp, ResetPrefixCacheOp, UpdateFromDiskOp,
                  InitUpdateGroupOp, UpdateFromDistributedOp, DestroyUpdateGroupOp, CollectiveRpcOp]


class ControlRequest(msgspec.Struct, tag="control"):
    call_id: int
    op: ControlOp


# ----- core -> client -----
class ControlReply(msgspec.Struct, tag="control_reply"):
    """`invalid`: the caller's mistake (400, `error` is for them); otherwise a failure (500)."""

    call_id: int
    ok: bool
    invalid: bool = False
    error: str = ""
    result: bytes = b""  # msgpack


class ControlError(RuntimeError):
    def __init__(self, message: str, invalid: bool) -> None:
        super().__init__(message)
        self.invalid = invalid


# ----- in the core process -----
def run_control(engine: "EngineCore", request: ControlRequest) -> tuple[list[EngineOutput], ControlReply]:
    """Run one call between steps: the outputs it produced (aborted requests) and the reply."""
    op = request.op
    outputs: list[EngineOutput] = []
    try:
        result: Any = None
        if isinstance(op, SleepOp):
            engine.sleep(op.level)
        elif isinstance(op, WakeUpOp):
            engine.wake_up(op.tags)
            result = engine.is_sleeping()
        elif isinstance(op, IsSleepingOp):
            result = engine.is_sleeping()
        elif isinstance(op, PauseOp):
            if op.abort:
                outputs = engine.abort_all()
            engine.pause()
        elif isinstance(op, ResumeOp):
            engine.resume()
        elif isinstance(op, ResetPrefixCacheOp):
            engine.reset_prefix_cache()
        elif isinstance(op, UpdateFromDiskOp):
            result = engine.update_weights_from_disk(op.path)
        elif isinstance(op, InitUpdateGroupOp):
            engine.init_weights_update_group(op.master_address, op.master_port, op.rank_offset, op.world_size,
                                             op.group_name, op.backend)
        elif isinstance(op, UpdateFromDistributedOp):
            result = engine.update_weights_from_distributed(op.specs, op.group_name, op.bucket_bytes)
        elif isinstance(op, DestroyUpdateGroupOp):
            engine.destroy_weights_update_group(op.group_name)
        elif isinstance(op, CollectiveRpcOp):
            args, kwargs = msgspec.msgpack.decode(op.payload)
            result = engine.collective_rpc(op.method, args, kwargs)
        reply = ControlReply(request.call_id, True, result=msgspec.msgpack.encode(result))
    except (ValueError, TypeError, KeyError, FileNotFoundError) as exc:
        reply = ControlReply(request.call_id, False, invalid=True, error=str(exc))
    except Exception as exc:  # noqa: BLE001 - the engine stays up; the caller learns it failed
        logger.exception("%s failed", type(op).__name__)
        reply = ControlReply(request.call_id, False, error=f"{type(exc).__name__}: {exc}")
    return outputs, reply


# ----- in the API process -----
class EngineSleepingError(RuntimeError):
    """Refused: the engine is paused or asleep and `--requests-while-paused reject` is set."""


class AdmissionGate:
    """Where new requests wait (or are refused) while the engine is paused or asleep."""

    def __init__(self, reject_while_closed: bool = False) -> None:
        self.reject_while_closed = reject_while_closed
        self._open = asyncio.Event()
        self._open.set()
        self.reason = ""

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def close(self, reason: str) -> None:
        self.reason = reason
        self._open.clear()

    def open(self) -> None:
        self.reason = ""
        self._open.set()

    async def admit(self) -> None:
        if self._open.is_set():
            return
        if self.reject_while_closed:
            raise EngineSleepingError(f"the engine is {self.reason}; retry later")
        await self._open.wait()


class ServedEngine(Protocol):
    """What `RolloutControl` needs of the `AsyncEngine` that owns it."""

    client: Any  # EngineCoreClient
    gate: AdmissionGate
    num_inflight_requests: int


class RolloutControl:
    """The RL calls of a served engine (what the routes in entrypoints/server/rl_routes.py call)."""

    def __init__(self, engine: ServedEngine) -> None:
        self.engine = engine
        self._call_ids = itertools.count()
        self.paused = False
        self.asleep = False
        self._lock = asyncio.Lock()  # one call at a time: each changes what the next one finds

    async def _call(self, op: ControlOp) -> Any:
        reply: ControlReply = await self.engine.client.control(ControlRequest(next(self._call_ids), op))
        if not reply.ok:
            raise ControlError(reply.error, reply.invalid)
        return msgspec.msgpack.decode(reply.result) if reply.result else None

    def _update_gate(self) -> None:
        if self.asleep or self.paused:
            self.engine.gate.close("asleep" if self.asleep else "paused")
        else:
            self.engine.gate.open()

    async def sleep(self, level: int) -> None:
        """Running requests are preempted and resume after waking; new ones meet the gate."""
        async with self._lock:
            self.engine.gate.close("asleep")
            try:
                await self._call(SleepOp(level))
                self.asleep = True
            finally:
                self._update_gate()

    async def wake_up(self, tags: list[str] | None = None) -> None:
        async with self._lock:
            self.asleep = bool(await self._call(WakeUpOp(tags)))
            self._update_gate()

    async def is_sleeping(self) -> bool:
        return bool(await self._call(IsSleepingOp()))

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """abort: unfinished requests end now (finish_reason "abort"); wait: they run to the end
        first; keep: they stay where they are and continue on `resume`. New requests meet the
        gate. `clear_cache` (abort and wait): drop the prefix cache too."""
        if mode not in PAUSE_MODES:
            raise ControlError(f"pause mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}", invalid=True)
        async with self._lock:
            self.paused = True
            self._update_gate()
            try:
                if mode == "wait":
                    while self.engine.num_inflight_requests:
                        await asyncio.sleep(INFLIGHT_POLL_S)
                await self._call(PauseOp(abort=mode == "abort"))
                if clear_cache and mode != "keep":
                    await self._call(ResetPrefixCacheOp())
            except BaseException:
                self.paused = False
                self._update_gate()
                raise

    async def resume_generation(self) -> None:
        async with self._lock:
            await self._call(ResumeOp())
            self.paused = False
            self._update_gate()

    async def reset_prefix_cache(self) -> None:
        await self._call(ResetPrefixCacheOp())

    async def update_weights_from_disk(self, path: str) -> int:
        async with self._lock:
            return await self._call(UpdateFromDiskOp(path))

    async def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                        world_size: int, group_name: str, backend: str | None) -> None:
        async with self._lock:
            await self._call(InitUpdateGroupOp(master_address, master_port, rank_offset, world_size, group_name,
                                               backend))

    async def update_weights_from_distributed(self, specs: list[TensorSpec], group_name: str) -> int:
        async with self._lock:
            return await self._call(UpdateFromDistributedOp(specs, group_name))

    async def destroy_weights_update_group(self, group_name: str) -> None:
        async with self._lock:
            await self._call(DestroyUpdateGroupOp(group_name))

    async def collective_rpc(self, method: str, args: list, kwargs: dict) -> list[Any]:
        async with self._lock:
            return await self._call(CollectiveRpcOp(method, msgspec.msgpack.encode([args, kwargs])))
