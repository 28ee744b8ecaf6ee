"""POST /v1/chat/completions: `chat.completion` JSON or a stream of `chat.completion.chunk`s.

With `--reasoning-parser` the model's thinking is returned apart from its answer
(`reasoning_content` / `reasoning`, streamed as deltas of the same names); with tools, calls are
read from the answer (`openai/tools.py`). Both go through one `OutputParser` per choice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenmill.engine.async_engine import AsyncEngine, RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.openai.common import (
    check_logit_bias, collect_final, render_chat, stream_error_chunk, usage_dict,
)
from tokenmill.entrypoints.openai.logprobs import chat_logprobs
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest
from tokenmill.entrypoints.openai.tools import ToolCalling, chat_message, chat_tool_calling, delta_to_openai
from tokenmill.entrypoints.reasoning import Start
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.output_parsing import OutputDelta, OutputParser, ServerParsers, merge_tool_deltas
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import (
    SSE_HEADERS, check_model, engine_of, merge_streams, new_id, request_timeout, sse, submit_all,
    to_api_error, unless_disconnected,
)
from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class ChatPlan:
    """How one chat request's output is produced and read."""

    params: SamplingParams
    tools: ToolCalling
    start: Start | None  # where the output begins relative to the thinking (None: no parser)
    role: str

    def output_parser(self, parsers: ServerParsers) -> OutputParser:
        return parsers.output_parser(self.start, self.tools.make_parser)


def parsers_of(request: Request) -> ServerParsers:
    return request.app.state.parsers


async def plan_chat(request: Request, engine: AsyncEngine, body: ChatCompletionRequest) -> tuple[str, ChatPlan]:
    """The prompt and the plan; raises `APIError` 400 for what cannot be served."""
    parsers = parsers_of(request)
    try:
        params = body.to_sampling_params(default_max_tokens=None, logprobs=body.num_logprobs(),
                                         defaults=engine.sampling_defaults)
        tools = chat_tool_calling(body, parsers.tool_parser)
        if tools.constraint is not None:
            params = params.clone(structured_outputs=tools.constraint)
        if body.thinking_token_budget is not None and parsers.reasoning is None:
            raise ValueError("thinking_token_budget needs a server started with --reasoning-parser")
    except ValueError as exc:
        raise to_api_error(exc) from None
    kwargs = dict(body.chat_template_kwargs or {})
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    prompt = await render_chat(engine, [m.to_template() for m in body.messages],
                               add_generation_prompt=body.add_generation_prompt,
                               chat_template_kwargs=kwargs or None,
                               tools=body.template_tools() if body.tool_choice != "none" else None)
    start = parsers.reasoning_start(prompt)
    reasoning = parsers.reasoning_params(start, body.thinking_token_budget)
    if reasoning is not None:
        params = params.clone(reasoning=reasoning)
    if parsers.keeps_special_tokens(tools.active):
        params = params.clone(skip_special_tokens=False)
    server = request.app.state.server.config
    # vLLM's rule: the reply's role is the server's --response-role when the prompt asks for a
    # new turn, else the role of the message being continued.
    role = server.response_role if body.add_generation_prompt else body.messages[-1].role
    return prompt, ChatPlan(params, tools, start, role)


async def create_chat_completion(request: Request) -> Response:
    arrival = time.monotonic()
    body = await read_model(request, ChatCompletionRequest)
    engine = engine_of(request)
    model = check_model(engine, body.model)
    check_logit_bias(engine, body.logit_bias)
    prompt, plan = await plan_chat(request, engine, body)
    request_id = new_id("chatcmpl")
    streams = await submit_all(engine, request_id, [prompt], plan.params, priority=body.priority,
                               cache_salt=body.cache_salt, chat=True, arrival=arrival,
                               timeout_s=request_timeout(request, body.timeout))
    created = int(time.time())
    parsers = parsers_of(request)
    with_reasoning = parsers.reasoning is not None and body.include_reasoning
    if body.stream:
        return StreamingResponse(_stream(engine, streams[0], body, request_id, model, created, plan, parsers,
                                         with_reasoning),
                                 media_type="text/event-stream", headers=SSE_HEADERS)
    final = await unless_disconnected(request, collect_final(streams[0]))
    choices = []
    for c in final.outputs:
        parser = plan.output_parser(parsers)
        parsed = parser.parse(c.text)
        if not with_reasoning:
            parsed.reasoning = None
        choices.append({
            "index": c.index,
            "message": chat_message(parsed, plan.role, with_reasoning=parsers.reasoning is not None),
            "logprobs": chat_logprobs(c.token_ids, c.logprobs, body.top_logprobs or 0) if body.logprobs else None,
            "finish_reason": "tool_calls" if parsed.tool_calls and c.finish_reason == "stop" else c.finish_reason,
        })
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    prompt_tokens = len(streams[0].prompt_token_ids)
    return JSONResponse({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices,
        "usage": usage_dict(prompt_tokens, completion_tokens, final.num_cached_tokens),
    })


async def _stream(engine: AsyncEngine, stream: RequestStream, body: ChatCompletionRequest, request_id: str,
                  model: str, created: int, plan: ChatPlan, parsers: ServerParsers,
                  with_reasoning: bool) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict], usage: dict | None = None) -> bytes:
        data = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices}
        if usage is not None:
            data["usage"] = usage
        return sse(data)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    prompt_tokens = len(stream.prompt_token_ids)
    completion_tokens = cached_tokens = 0
    outputs = [plan.output_parser(parsers) for _ in range(body.n)]  # one per choice
    try:
        # OpenAI opens every choice with a role-only delta.
        yield chunk([{"index": i, "delta": {"role": plan.role, "content": ""}, "logprobs": None,
                      "finish_reason": None} for i in range(body.n)])
        async for _, out in merge_streams([stream]):
            cached_tokens = max(cached_tokens, out.num_cached_tokens)
            choices = []
            for c in out.outputs:
                completion_tokens += len(c.token_ids)
                if c.finish_reason == "error":
                    raise EngineDeadError("the engine failed while serving this request")
                parser = outputs[c.index]
                piece = parser.feed(c.text) if c.text else None
                if c.finish_reason is not None:
                    rest = parser.finish()
                    piece = _join(piece, rest)
                if piece is not None and not with_reasoning:
                    piece.reasoning = None
                delta = delta_to_openai(piece) if piece is not None else {}
                finish_reason = c.finish_reason
                if parser.called_tools and finish_reason == "stop":
                    finish_reason = "tool_calls"
                if not delta and finish_reason is None and not (body.logprobs and c.token_ids):
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


def _join(first: OutputDelta | None, second: OutputDelta) -> OutputDelta:
    """Two deltas of one step as one (the step's text, then what finishing flushed)."""
    if first is None:
        return second
    return OutputDelta(
        reasoning=(first.reasoning or "") + (second.reasoning or "") or None,
        content=(first.content or "") + (second.content or "") or None,
        tool_calls=merge_tool_deltas(first.tool_calls + second.tool_calls))


__all__ = ["create_chat_completion", "plan_chat", "APIError"]
