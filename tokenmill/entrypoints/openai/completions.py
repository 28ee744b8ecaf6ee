"""POST /v1/completions: legacy text completions, one or many prompts, streamed or not.

Choice `index` is `prompt_index * n + sample_index`, as in OpenAI's API.
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine, RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.common import check_logit_bias, collect_final, stream_error_chunk, usage_dict
from tokenmill.entrypoints.openai.logprobs import completion_logprobs
from tokenmill.entrypoints.openai.protocol import CompletionRequest
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import (
    SSE_HEADERS, check_model, engine_of, merge_streams, new_id, request_timeout, sse, submit_all,
    to_api_error, unless_disconnected,
)
from tokenmill.outputs import CompletionOutput, RequestOutput


async def create_completion(request: Request) -> Response:
    arrival = time.monotonic()
    body = await read_model(request, CompletionRequest)
    engine = engine_of(request)
    model = check_model(engine, body.model)
    check_logit_bias(engine, body.logit_bias)
    want_prompt_logprobs = body.echo and body.logprobs is not None
    try:
        params = body.to_sampling_params(default_max_tokens=None, logprobs=body.logprobs,
                                         prompt_logprobs=body.logprobs if want_prompt_logprobs else None,
                                         defaults=engine.sampling_defaults)
    except ValueError as exc:
        raise to_api_error(exc) from None
    request_id = new_id("cmpl")
    streams = await submit_all(engine, request_id, body.prompts(), params, priority=body.priority,
                               cache_salt=body.cache_salt, arrival=arrival,
                               timeout_s=request_timeout(request, body.timeout))
    created = int(time.time())
    if body.stream:
        return StreamingResponse(_stream(engine, streams, body, request_id, model, created),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def collect_all() -> list[RequestOutput]:
        return [await collect_final(s) for s in streams]

    try:
        finals = await unless_disconnected(request, collect_all())
    finally:
        for s in streams:
            engine.abort(s.request_id)
    choices = []
    for p, final in enumerate(finals):
        for c in final.outputs:
            choices.append(_choice(engine, body, p * body.n + c.index, c, final, streams[p], echo=body.echo))
    completion_tokens = 0 if body.echo_only else sum(len(c.token_ids) for f in finals for c in f.outputs)
    prompt_tokens = sum(len(s.prompt_token_ids) for s in streams)
    return JSONResponse({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": choices,
        "usage": usage_dict(prompt_tokens, completion_tokens, sum(f.num_cached_tokens for f in finals)),
    })


def _choice(engine: AsyncEngine, body: CompletionRequest, index: int, c: CompletionOutput,
            out: RequestOutput, stream: RequestStream, *, echo: bool, text_offset: int = 0) -> dict:
    text, logprobs = c.text, None
    finish_reason = c.finish_reason
    if body.echo_only:  # the one token the engine sampled is not part of the answer
        text, c = "", CompletionOutput(index=c.index, text="", token_ids=[],
                                       logprobs=[] if c.logprobs is not None else None)
        finish_reason = "length" if finish_reason is not None else None
    if body.logprobs is not None:
        logprobs = completion_logprobs(c.token_ids, c.logprobs, body.logprobs, text_offset)
    if echo:
        prompt_text = out.prompt if out.prompt is not None else engine.decode(stream.prompt_token_ids)
        text = prompt_text + text
        if logprobs is not None and out.prompt_logprobs is not None:
            prompt_lp = completion_logprobs(stream.prompt_token_ids, out.prompt_logprobs, body.logprobs,
                                            token_text=lambda t: engine.decode([t]))
            shift = len(prompt_text)
            logprobs = {
                "tokens": prompt_lp["tokens"] + logprobs["tokens"],
                "token_logprobs": prompt_lp["token_logprobs"] + logprobs["token_logprobs"],
                "top_logprobs": prompt_lp["top_logprobs"] + logprobs["top_logprobs"],
                "text_offset": prompt_lp["text_offset"] + [o + shift for o in logprobs["text_offset"]],
            }
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


async def _stream(engine: AsyncEngine, streams: list[RequestStream], body: CompletionRequest,
                  request_id: str, model: str, created: int) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        data = {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    echoed: set[int] = set()
    text_offsets: dict[int, int] = {}  # per choice: characters sent so far, for logprobs.text_offset
    completion_tokens = 0
    cached: dict[int, int] = {}  # per prompt: its tokens served from the prefix cache
    try:
        async for p, out in merge_streams(streams):
            cached[p] = max(cached.get(p, 0), out.num_cached_tokens)
            choices = []
            for c in out.outputs:
                if c.finish_reason == "error":
                    raise EngineDeadError("the engine failed while serving this request")
                completion_tokens += 0 if body.echo_only else len(c.token_ids)
                index = p * body.n + c.index
                echo = body.echo and index not in echoed
                echoed.add(index)
                if not c.text and c.finish_reason is None and not echo and not c.token_ids:
                    continue
                choice = _choice(engine, body, index, c, out, streams[p], echo=echo,
                                 text_offset=text_offsets.get(index, 0))
                text_offsets[index] = text_offsets.get(index, 0) + len(choice["text"])
                choices.append(choice)
            if choices:
                yield chunk(choices)
        if include_usage:
            prompt_tokens = sum(len(s.prompt_token_ids) for s in streams)
            yield chunk([], usage_dict(prompt_tokens, completion_tokens, sum(cached.values())))
        yield sse("[DONE]")
    except (EngineDeadError, RequestTimeoutError) as exc:
        yield stream_error_chunk(exc)
    finally:
        for s in streams:
            engine.abort(s.request_id)


__all__ = ["create_completion", "APIError"]
