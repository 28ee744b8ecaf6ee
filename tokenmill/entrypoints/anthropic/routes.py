"""POST /v1/messages (JSON or the Anthropic SSE event sequence) and /v1/messages/count_tokens.

Stream order, as the official SDK expects it: `message_start`, `content_block_start`, `ping`,
`content_block_delta`..., `content_block_stop`, `message_delta` (stop_reason, usage),
`message_stop`. A failure after the stream started is an `event: error`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine, RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from tokenmill.entrypoints.anthropic.tools import BlockStreamer, content_blocks, plan_tool_use
from tokenmill.entrypoints.openai.common import collect_final, encode, render_chat
from tokenmill.entrypoints.openai.tools import ToolCalling
from tokenmill.entrypoints.reasoning import Start
from tokenmill.entrypoints.server.errors import APIError, anthropic_error_body
from tokenmill.entrypoints.server.output_parsing import OutputParser, ServerParsers
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import (
    SSE_HEADERS, check_model, engine_of, request_timeout, sse, submit_all, to_api_error, unless_disconnected,
)
from tokenmill.outputs import CompletionOutput
from tokenmill.sampling_params import SamplingParams

router = APIRouter()

THINKING_NEEDS_PARSER = "thinking needs a server started with --reasoning-parser (the model's thinking format)"


@dataclass(frozen=True)
class MessagePlan:
    params: SamplingParams
    tools: ToolCalling
    start: Start | None
    show_thinking: bool  # thinking blocks in the response (the request enabled thinking)
    redact_thinking: bool

    def output_parser(self, parsers: ServerParsers) -> OutputParser:
        return parsers.output_parser(self.start, self.tools.make_parser)


def _stop_reason(c: CompletionOutput, stop_sequences: list[str] | None) -> tuple[str, str | None]:
    if c.finish_reason == "length":
        return "max_tokens", None
    if isinstance(c.stop_reason, str) and stop_sequences and c.stop_reason in stop_sequences:
        return "stop_sequence", c.stop_reason
    return "end_turn", None


def _usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict:
    # Anthropic counts cache reads apart from `input_tokens` (the total prompt is their sum);
    # nothing is billed for writing the cache here, so its creation count is 0.
    return {"input_tokens": prompt_tokens - cached_tokens, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached_tokens, "output_tokens": output_tokens}


def _headers(message_id: str) -> dict[str, str]:
    return {"request-id": f"req_{message_id[4:]}"}


async def _plan(request: Request, engine: AsyncEngine, body: MessagesRequest) -> tuple[str, MessagePlan]:
    parsers: ServerParsers = request.app.state.parsers
    thinking = body.thinking
    try:
        if thinking is not None and thinking.enabled and parsers.reasoning is None:
            raise ValueError(THINKING_NEEDS_PARSER)
        params = body.to_sampling_params()
        tools = plan_tool_use(body, parsers.tool_parser)
        if tools.constraint is not None:  # a forced tool use wins over output_config.format
            params = params.clone(structured_outputs=tools.constraint)
    except ValueError as exc:
        raise to_api_error(exc, anthropic=True) from None
    prompt = await render_chat(engine, body.chat_messages(), add_generation_prompt=True,
                               tools=body.template_tools(), chat_template_kwargs=body.template_kwargs())
    start = parsers.reasoning_start(prompt)
    budget = thinking.budget_tokens if thinking is not None and thinking.enabled else None
    reasoning = parsers.reasoning_params(start, budget)
    if reasoning is not None:
        params = params.clone(reasoning=reasoning)
    if parsers.keeps_special_tokens(tools.active):
        params = params.clone(skip_special_tokens=False)
    show = thinking is not None and thinking.enabled
    return prompt, MessagePlan(params, tools, start, show, show and thinking.display == "omitted")


@router.post("/v1/messages")
async def create_message(request: Request) -> Response:
    arrival = time.monotonic()
    body = await read_model(request, MessagesRequest)
    engine = engine_of(request)
    model = check_model(engine, body.model)
    prompt, plan = await _plan(request, engine, body)
    message_id = f"msg_{uuid.uuid4().hex}"
    streams = await submit_all(engine, message_id, [prompt], plan.params, anthropic=True, chat=True,
                               cache_salt=body.cache_salt, arrival=arrival,
                               timeout_s=request_timeout(request, body.timeout))
    stream = streams[0]
    parsers: ServerParsers = request.app.state.parsers
    if body.stream:
        return StreamingResponse(_stream(engine, stream, body, message_id, model, plan, parsers),
                                 media_type="text/event-stream",
                                 headers={**SSE_HEADERS, **_headers(message_id)})
    final = await unless_disconnected(request, collect_final(stream))
    c = final.outputs[0]
    stop_reason, stop_sequence = _stop_reason(c, body.stop_sequences)
    parsed = plan.output_parser(parsers).parse(c.text)
    if parsed.tool_calls and c.finish_reason == "stop":
        stop_reason, stop_sequence = "tool_use", None
    return JSONResponse({
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": content_blocks(parsed, plan.show_thinking, plan.redact_thinking),
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": _usage(len(stream.prompt_token_ids), final.num_cached_tokens, len(c.token_ids)),
    }, headers=_headers(message_id))


async def _stream(engine: AsyncEngine, stream: RequestStream, body: MessagesRequest, message_id: str,
                  model: str, plan: MessagePlan, parsers: ServerParsers) -> AsyncIterator[bytes]:
    input_tokens = len(stream.prompt_token_ids)
    output_tokens = cached_tokens = 0
    parser = plan.output_parser(parsers)
    blocks = BlockStreamer(plan.show_thinking, plan.redact_thinking)
    # A response that can only be text opens its one text block at once, as Anthropic's API does.
    plain = parser.reasoning is None and parser.tools is None
    try:
        yield sse({"type": "message_start", "message": {
            "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": None, "stop_sequence": None,
            # The cache hit is known only after the first step: message_delta carries the final split.
            "usage": {"input_tokens": input_tokens, "output_tokens": 0}}}, event="message_start")
        if plain:
            for event in blocks.open_text():
                yield event
        yield sse({"type": "ping"}, event="ping")
        last = None
        async for out in stream:
            if not out.outputs:
                continue
            cached_tokens = max(cached_tokens, out.num_cached_tokens)
            c = out.outputs[0]
            if c.finish_reason == "error":
                raise EngineDeadError("the engine failed while serving this request")
            output_tokens += len(c.token_ids)
            last = c
            if c.text:
                for event in blocks.feed(parser.feed(c.text)):
                    yield event
        stop_reason, stop_sequence = _stop_reason(last, body.stop_sequences) if last else ("end_turn", None)
        for event in blocks.feed(parser.finish()) + blocks.finish():
            yield event
        if blocks.used_tool and last is not None and last.finish_reason == "stop":
            stop_reason, stop_sequence = "tool_use", None
        yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                   "usage": _usage(input_tokens, cached_tokens, output_tokens)}, event="message_delta")
        yield sse({"type": "message_stop"}, event="message_stop")
    except RequestTimeoutError as exc:
        yield sse(anthropic_error_body(APIError(408, str(exc))), event="error")
    except EngineDeadError:
        yield sse(anthropic_error_body(APIError(500, "the engine failed while serving this request")),
                  event="error")
    finally:
        engine.abort(stream.request_id)


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request) -> JSONResponse:
    body = await read_model(request, CountTokensRequest)
    engine = engine_of(request)
    check_model(engine, body.model)
    prompt = await render_chat(engine, body.chat_messages(), add_generation_prompt=True,
                               tools=body.template_tools())
    return JSONResponse({"input_tokens": len(await encode(engine, prompt, add_special_tokens=False))})


__all__ = ["router", "APIError"]
