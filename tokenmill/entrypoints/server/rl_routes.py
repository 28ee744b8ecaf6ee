"""The RL routes (docs/rl.md), with vLLM's and SGLang's names and shapes so RL frameworks can point
at a tokenmill server. Every one is behind `--api-key`; none exists unless asked for:

- `--enable-sleep-mode` (as vLLM): POST /sleep?level=1|2, POST /wake_up[?tags=weights&tags=kv_cache],
  GET /is_sleeping.
- `--enable-weight-updates`: POST /pause?mode=abort|wait|keep&clear_cache=true, POST /resume,
  GET /is_paused, POST /reset_prefix_cache, POST /update_weights_from_disk {"model_path"},
  POST /init_weights_update_group, POST /update_weights_from_distributed,
  POST /destroy_weights_update_group (SGLang's bodies), POST /collective_rpc {"method", "args",
  "kwargs"} (vLLM's; what checkpoint-engine calls with "update_weights_from_ipc").
"""

from __future__ import annotations

from typing import Any, Awaitable, TypeVar

import pydantic
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from tokenmill.distributed.weight_transfer import DEFAULT_GROUP_NAME, specs_from
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.engine.rl_control import PAUSE_MODES, ControlError, RolloutControl
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import engine_of

T = TypeVar("T")
sleep_router = APIRouter()
weights_router = APIRouter()


def _rollouts(request: Request) -> RolloutControl:
    return engine_of(request).rollouts


async def _run(work: Awaitable[T]) -> T:
    try:
        return await work
    except ControlError as exc:
        if exc.invalid:
            raise APIError(400, str(exc)) from None
        raise APIError(500, "the engine failed the call (the server log has the details)") from None
    except EngineDeadError:
        raise APIError(503, "the engine is not running") from None


# ----- sleep mode -----
@sleep_router.post("/sleep")
async def sleep(request: Request, level: int = Query(1)) -> JSONResponse:
    await _run(_rollouts(request).sleep(level))
    return JSONResponse({"status": "asleep", "level": level})


@sleep_router.post("/wake_up")
async def wake_up(request: Request, tags: list[str] | None = Query(None)) -> JSONResponse:
    await _run(_rollouts(request).wake_up(tags))
    return JSONResponse({"status": "awake" if not _rollouts(request).asleep else "partly awake"})


@sleep_router.get("/is_sleeping")
async def is_sleeping(request: Request) -> JSONResponse:
    return JSONResponse({"is_sleeping": await _run(_rollouts(request).is_sleeping())})


# ----- pause, prefix cache, weights -----
@weights_router.post("/pause")
async def pause(request: Request, mode: str = Query("abort"), clear_cache: bool = Query(True)) -> JSONResponse:
    if mode not in PAUSE_MODES:
        raise APIError(400, f"mode must be one of {', '.join(PAUSE_MODES)}", param="mode")
    await _run(_rollouts(request).pause_generation(mode, clear_cache))
    return JSONResponse({"status": "paused"})


@weights_router.post("/resume")
async def resume(request: Request) -> JSONResponse:
    await _run(_rollouts(request).resume_generation())
    return JSONResponse({"status": "resumed"})


@weights_router.get("/is_paused")
async def is_paused(request: Request) -> JSONResponse:
    return JSONResponse({"is_paused": _rollouts(request).paused})


@weights_router.post("/reset_prefix_cache")
async def reset_prefix_cache(request: Request) -> JSONResponse:
    await _run(_rollouts(request).reset_prefix_cache())
    return JSONResponse({"success": True})


class UpdateFromDiskRequest(pydantic.BaseModel):
    model_path: str = pydantic.Field(min_length=1)
    load_format: str | None = None  # SGLang's field; the path's kind decides here


@weights_router.post("/update_weights_from_disk")
async def update_weights_from_disk(request: Request) -> JSONResponse:
    body = await read_model(request, UpdateFromDiskRequest)
    loaded = await _run(_rollouts(request).update_weights_from_disk(body.model_path))
    return JSONResponse({"success": True, "message": f"updated {loaded} parameters", "num_parameters": loaded})


class InitGroupRequest(pydantic.BaseModel):
    master_address: str = pydantic.Field(min_length=1)
    master_port: int = pydantic.Field(gt=0, lt=65536)
    rank_offset: int = pydantic.Field(ge=1)
    world_size: int = pydantic.Field(ge=2)
    group_name: str = DEFAULT_GROUP_NAME
    backend: str | None = pydantic.Field(None, pattern="^(nccl|gloo)$")


@weights_router.post("/init_weights_update_group")
async def init_weights_update_group(request: Request) -> JSONResponse:
    body = await read_model(request, InitGroupRequest)
    await _run(_rollouts(request).init_weights_update_group(
        body.master_address, body.master_port, body.rank_offset, body.world_size, body.group_name, body.backend))
    return JSONResponse({"success": True, "message": f"joined {body.group_name}"})


class UpdateFromDistributedRequest(pydantic.BaseModel):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = DEFAULT_GROUP_NAME
    flush_cache: bool = True  # SGLang's field: the prefix cache is always dropped after an update


@weights_router.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: Request) -> JSONResponse:
    body = await read_model(request, UpdateFromDistributedRequest)
    try:
        specs = specs_from(body.names, body.dtypes, body.shapes)
    except ValueError as exc:
        raise APIError(400, str(exc)) from None
    loaded = await _run(_rollouts(request).update_weights_from_distributed(specs, body.group_name))
    return JSONResponse({"success": True, "message": f"updated {loaded} parameters", "num_parameters": loaded})


class GroupRequest(pydantic.BaseModel):
    group_name: str = DEFAULT_GROUP_NAME


@weights_router.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: Request) -> JSONResponse:
    body = await read_model(request, GroupRequest)
    await _run(_rollouts(request).destroy_weights_update_group(body.group_name))
    return JSONResponse({"success": True})


class CollectiveRpcRequest(pydantic.BaseModel):
    method: str = pydantic.Field(min_length=1)
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float | None = None  # vLLM's field; the call runs to its end


@weights_router.post("/collective_rpc")
async def collective_rpc(request: Request) -> JSONResponse:
    body = await read_model(request, CollectiveRpcRequest)
    results = await _run(_rollouts(request).collective_rpc(body.method, body.args, body.kwargs))
    return JSONResponse({"results": results})
