"""POST /v1/chat/completions: `chat.completion` JSON or a stream of `chat.completion.chunk`s."""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.logprobs import chat_logprobs
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
from tokenmill.entrypoints.openai.tools import ToolCalling, delta_to_openai, message_from_text, plan_tool_calling
from tokenmill.entrypoints.openai.common import (
    check_logit_bias, collect_final, render_chat, stream_error_chunk, usage_dict,
)
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import (
    SSE_HEADERS, check_model, engine_of, merge_streams, new_id, request_timeout, sse, submit_all,
    to_api_error, unless_disconnected,
)


async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    body = await read_model(request, ChatCompletionRequest)
    engine = engine_of(request)
    model = check_model(engine, body.model)
    check_logit_bias(engine, body.logit_bias)
    try:
        params = body.to_sampling_params(default_max_tokens=None, logprobs=body.num_logprobs(),
                                         defaults=engine.sampling_defaults)
        tools = plan_tool_calling(body, request.app.state.server.config.tool_call_parser)
        if tools.constraint is not None:
            if params.structured_outputs is not None:
                raise ValueError("a forced tool_choice cannot be combined with response_format")
            params = params.clone(structured_outputs=tools.constraint)
    except ValueError as exc:
        raise to_api_error(exc) from None
    prompt = await render_chat(engine, [m.to_template() for m in body.messages],
                               add_generation_prompt=body.add_generation_prompt,
                               chat_template_kwargs=body.chat_template_kwargs,
                               tools=body.template_tools() if body.tool_choice != "none" else None)
    request_id = new_id("chatcmpl")
    streams = await submit_all(engine, request_id, [prompt], params, priority=body.priority,
                               cache_salt=body.cache_salt, chat=True, arrival=arrival,
                               timeout_s=request_timeout(request, body.timeout))
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(engine, streams[0], body, request_id, model, created, tools),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    final = await unless_disconnected(request, collect_final(streams[0]))
    choices = []
    for c in final.outputs:
        message, called = message_from_text(c.text, tools.make_parser() if tools.active else None)
        choices.append({
            "index": c.index,
            "message": message,
            "logprobs": chat_logprobs(c.token_ids, c.logprobs, body.top_logprobs or 0) if body.logprobs else None,
            "finish_reason": "tool_calls" if called and c.finish_reason == "stop" else c.finish_reason,
        })
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    prompt_tokens = len(streams[0].prompt_token_ids)
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices,
        "usage": usage_dict(prompt_tokens, completion_tokens, final.num_cached_tokens),
    })


async def _stream(engine, stream: RequestStream, body: ChatCompletionRequest, request_id: str,
                  model: str, created: int, tools: ToolCalling) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    prompt_tokens = len(stream.prompt_token_ids)
    completion_tokens = cached_tokens = 0
    # Per choice, with tools: its parser, its text so far, and whether it called a tool.
    parsers = [tools.make_parser() for _ in range(body.n)] if tools.active else None
    texts = [""] * body.n
    called = [False] * body.n
    try:
        # OpenAI opens every choice with a role-only delta.
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(body.n)])
        async for _, out in merge_streams([stream]):
            cached_tokens = max(cached_tokens, out.num_cached_tokens)
            choices = []
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if c.finish_reason == "error":
                    raise EngineDeadError("the engine failed while serving this request")
                if not c.text and c.finish_reason is None and not c.token_ids:
                    continue
                delta = {"content": c.text} if c.text else {}
                finish_reason = c.finish_reason
                if parsers is not None:
                    previous, texts[c.index] = texts[c.index], texts[c.index] + c.text
                    parser = parsers[c.index]
                    parts = [parser.extract_tool_calls_streaming(previous, texts[c.index], c.text)]
                    if c.finish_reason is not None:
                        parts.append(parser.finish_streaming(texts[c.index]))
                    delta = delta_to_openai(*parts)
                    called[c.index] = called[c.index] or "tool_calls" in delta
                    if called[c.index] and finish_reason == "stop":
                        finish_reason = "tool_calls"
                    if not delta and finish_reason is None:
                        continue
                choices.append({
                    "index": c.index,
                    "delta": delta,
                    "logprobs": chat_logprobs(c.token_ids, c.logprobs, body.top_logprobs or 0)
                    if body.logprobs else None,
                    "finish_reason": finish_reason,
                })
            if choices:
                yield chunk(choices)
        if include_usage:
            yield chunk([], usage_dict(prompt_tokens, completion_tokens, cached_tokens))
        yield sse("[DONE]")
    except (EngineDeadError, RequestTimeoutError) as exc:
        yield stream_error_chunk(exc)
    finally:
        engine.abort(stream.request_id)  # no-op when it finished; frees KV on a disconnect


__all__ = ["create_chat_completion", "APIError"]
