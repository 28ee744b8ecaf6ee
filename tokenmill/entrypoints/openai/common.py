"""Pieces the chat and completions handlers (and the Anthropic one) share."""

from __future__ import annotations

import jinja2
from fastapi import Request

from tokenmill.engine.async_engine import AsyncEngine, RequestStream
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.entrypoints.server.errors import APIError, openai_error_body
from tokenmill.entrypoints.server.serving import sse
from tokenmill.outputs import RequestOutput


def check_logit_bias(engine: AsyncEngine, logit_bias: dict[str, float] | None) -> None:
    """Token ids in `logit_bias` must exist in the vocabulary (protocol checked they are integers)."""
    if not logit_bias:
        return
    bad = [k for k in logit_bias if not 0 <= int(k) < engine.vocab_size]
    if bad:
        raise APIError(400, f"logit_bias has token ids outside the vocabulary [0, {engine.vocab_size}): "
                            f"{bad[:10]}", param="logit_bias")


def render_chat(request: Request, engine: AsyncEngine, messages: list[dict], *, add_generation_prompt: bool,
                chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                tools: list[dict] | None = None) -> str:
    """The prompt text from the model's chat template (sandboxed Jinja in the input processor)."""
    if chat_template is not None:
        # A request-supplied template is code run on the server (RELIABILITY.md item 16).
        raise APIError(400, "request-supplied chat templates are not allowed on this server",
                       param="chat_template")
    try:
        return engine.input_processor.render_chat(messages, tools=tools,
                                                  add_generation_prompt=add_generation_prompt,
                                                  chat_template_kwargs=chat_template_kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as exc:
        # Templates raise on e.g. roles that do not alternate; their message is written for users.
        raise APIError(400, f"the chat template rejected these messages: {exc}"[:500]) from None


async def collect_final(stream: RequestStream) -> RequestOutput:
    """The last output of a stream; 500 if the engine failed while serving it."""
    final = None
    try:
        async for out in stream:
            final = out
    except EngineDeadError:
        raise APIError(500, "the engine failed while serving this request") from None
    if final is None or any(c.finish_reason == "error" for c in final.outputs):
        raise APIError(500, "the engine failed while serving this request")
    return final


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's `usage`; `cached_tokens` are prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def stream_error_chunk() -> bytes:
    """How an OpenAI stream reports a failure after it started: a `data:` chunk with `error`."""
    return sse(openai_error_body(APIError(500, "the engine failed while serving this request")))
