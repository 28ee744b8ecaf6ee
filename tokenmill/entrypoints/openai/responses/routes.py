"""`POST /v1/responses` (JSON or the SDK's event stream), `GET` and `DELETE /v1/responses/{id}`.

A response runs like a chat completion: its input items become chat messages (after those of
`previous_response_id`, when given), the model's own template renders them with the tools, and
one `OutputParser` reads thinking, answer and calls from the output. Stored responses (the
default, `store: true`) live in the server's bounded memory (`store.py`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine, RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.common import collect_final, render_chat
from tokenmill.entrypoints.openai.responses.output import ResponseEvents, item_id, items_to_turn, output_items
from tokenmill.entrypoints.openai.responses.protocol import ResponsesRequest
from tokenmill.entrypoints.openai.responses.store import ResponseStore
from tokenmill.entrypoints.openai.tools import ToolCalling, plan_tool_calling
from tokenmill.entrypoints.reasoning import Start
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.output_parsing import OutputParser, ServerParsers
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import (
    SSE_HEADERS, check_model, engine_of, request_timeout, submit_all, to_api_error, unless_disconnected,
)
from tokenmill.sampling_params import SamplingParams

router = APIRouter()


def store_of(request: Request) -> ResponseStore:
    return request.app.state.responses


@dataclass(frozen=True)
class ResponsePlan:
    """How one response is produced and read, and the conversation it continues."""

    params: SamplingParams
    tools: ToolCalling
    start: Start | None  # where the output begins relative to the thinking (None: no parser)
    conversation: list[dict[str, Any]]  # the stored turns, then this request's input, as chat messages

    def output_parser(self, parsers: ServerParsers) -> OutputParser:
        return parsers.output_parser(self.start, self.tools.make_parser)


async def _plan(request: Request, engine: AsyncEngine, body: ResponsesRequest) -> tuple[str, ResponsePlan]:
    parsers: ServerParsers = request.app.state.parsers
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        stored = store_of(request).get(body.previous_response_id)
        if stored is None:
            raise APIError(404, f"Previous response with id '{body.previous_response_id[:100]}' not found.",
                           param="previous_response_id")
        history = stored.messages
    try:
        params = body.to_sampling_params(engine.sampling_defaults)
        tools = plan_tool_calling(body.template_tools(), body.tool_choice_value(), body.parallel_tool_calls,
                                  parsers.tool_parser)
        if tools.constraint is not None:
            params = params.clone(structured_outputs=tools.constraint)
        if body.thinking_token_budget is not None and parsers.reasoning is None:
            raise ValueError("thinking_token_budget needs a server started with --reasoning-parser")
    except ValueError as exc:
        raise to_api_error(exc) from None
    conversation = history + body.input_messages()
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    prompt = await render_chat(engine, system + conversation, add_generation_prompt=True,
                               chat_template_kwargs=body.template_kwargs(),
                               tools=body.template_tools() if body.tool_choice != "none" else None)
    start = parsers.reasoning_start(prompt)
    reasoning = parsers.reasoning_params(start, body.thinking_token_budget)
    if reasoning is not None:
        params = params.clone(reasoning=reasoning)
    if parsers.keeps_special_tokens(tools.active):
        params = params.clone(skip_special_tokens=False)
    return prompt, ResponsePlan(params, tools, start, conversation)


def _response(body: ResponsesRequest, response_id: str, model: str, created: int, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
    fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
        else {"type": "text"}
    return {
        "id": response_id, "object": "response", "created_at": created, "model": model, "status": status,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls, "previous_response_id": body.previous_response_id,
        "reasoning": body.reasoning.model_dump(exclude_none=True) if body.reasoning else None,
        "store": body.store, "temperature": body.temperature, "text": {"format": fmt},
        "tool_choice": _tool_choice(body),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "top_p": body.top_p, "truncation": "disabled", "user": body.user, "usage": usage,
    }


def _tool_choice(body: ResponsesRequest) -> Any:
    choice = body.tool_choice
    if choice is None:
        return "auto"
    return choice if isinstance(choice, str) else choice.model_dump()


def _usage(prompt_tokens: int, output_tokens: int, cached_tokens: int, reasoning_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": prompt_tokens + output_tokens}


@router.post("/v1/responses")
async def create_response(request: Request) -> Response:
    arrival = time.monotonic()
    body = await read_model(request, ResponsesRequest)
    engine = engine_of(request)
    model = check_model(engine, body.model)
    prompt, plan = await _plan(request, engine, body)
    response_id = item_id("resp")
    streams = await submit_all(engine, response_id, [prompt], plan.params, priority=body.priority,
                               cache_salt=body.cache_salt, chat=True, arrival=arrival,
                               timeout_s=request_timeout(request, body.timeout))
    created = int(time.time())
    parsers: ServerParsers = request.app.state.parsers
    if body.stream:
        return StreamingResponse(_stream(request, engine, streams[0], body, response_id, model, created, plan),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    final = await unless_disconnected(request, collect_final(streams[0]))
    c = final.outputs[0]
    parsed = plan.output_parser(parsers).parse(c.text)
    incomplete = c.finish_reason == "length"
    items = output_items(parsed, parsers.reasoning is not None, incomplete)
    usage = _usage(len(streams[0].prompt_token_ids), len(c.token_ids), final.num_cached_tokens,
                   parsers.reasoning_token_count(c.token_ids, plan.start) if parsed.reasoning else 0)
    response = _response(body, response_id, model, created, "incomplete" if incomplete else "completed",
                         items, usage)
    if body.store:
        store_of(request).put(response, plan.conversation + items_to_turn(items))
    return JSONResponse(response)


async def _stream(request: Request, engine: AsyncEngine, stream: RequestStream, body: ResponsesRequest,
                  response_id: str, model: str, created: int, plan: ResponsePlan) -> AsyncIterator[bytes]:
    parsers: ServerParsers = request.app.state.parsers
    parser = plan.output_parser(parsers)
    events = ResponseEvents(with_reasoning=parsers.reasoning is not None)
    token_ids: list[int] = []
    cached_tokens = 0
    last = None
    try:
        snapshot = _response(body, response_id, model, created, "in_progress", [], None)
        yield events.event("response.created", response=snapshot)
        yield events.event("response.in_progress", response=snapshot)
        async for out in stream:
            if not out.outputs:
                continue
            cached_tokens = max(cached_tokens, out.num_cached_tokens)
            c = out.outputs[0]
            if c.finish_reason == "error":
                raise EngineDeadError("the engine failed while serving this request")
            token_ids += c.token_ids
            last = c
            if c.text:
                for event in events.feed(parser.feed(c.text)):
                    yield event
        incomplete = last is not None and last.finish_reason == "length"
        for event in events.feed(parser.finish()) + events.finish(incomplete):
            yield event
        reasoning_tokens = parsers.reasoning_token_count(token_ids, plan.start) \
            if any(i["type"] == "reasoning" for i in events.items) else 0
        usage = _usage(len(stream.prompt_token_ids), len(token_ids), cached_tokens, reasoning_tokens)
        status = "incomplete" if incomplete else "completed"
        response = _response(body, response_id, model, created, status, events.items, usage)
        if body.store:
            store_of(request).put(response, plan.conversation + items_to_turn(events.items))
        yield events.event(f"response.{status}", response=response)
    except (EngineDeadError, RequestTimeoutError) as exc:
        timeout = isinstance(exc, RequestTimeoutError)
        yield events.event("error", code="request_timeout" if timeout else "server_error",
                           message=str(exc) if timeout else "the engine failed while serving this request",
                           param=None)
    finally:
        engine.abort(stream.request_id)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, response_id: str) -> JSONResponse:
    stored = store_of(request).get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id[:100]}' not found.", param="response_id")
    return JSONResponse(stored.response)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> JSONResponse:
    if not store_of(request).delete(response_id):
        raise APIError(404, f"Response with id '{response_id[:100]}' not found.", param="response_id")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})
