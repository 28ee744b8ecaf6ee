"""Pieces the chat and completions handlers (and the Anthropic one) share."""

from __future__ import annotations

from tokenmill.engine.async_engine import AsyncEngine, RequestStream, RequestTimeoutError
from tokenmill.engine.core_client import EngineDeadError
from tokenmill.engine.input_processor import ContextLengthError
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


async def render_chat(engine: AsyncEngine, messages: list[dict], *, add_generation_prompt: bool,
                      chat_template_kwargs: dict | None = None, tools: list[dict] | None = None) -> str:
    """The prompt text from the model's own chat template, rendered on the engine's input thread
    (request-supplied templates are refused by the protocol models, docs/reliability.md item 16)."""
    try:
        return await engine.render_chat(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                        chat_template_kwargs=chat_template_kwargs)
    except ValueError as exc:  # ChatTemplateError and the like: messages written for users
        raise APIError(400, str(exc)) from None


async def encode(engine: AsyncEngine, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids for /tokenize and count_tokens, on the input thread; 400 for text that is too
    long to ever fit the context window (no point tokenizing megabytes to say so)."""
    try:
        return await engine.encode(text, add_special_tokens=add_special_tokens)
    except ContextLengthError as exc:
        raise APIError(400, str(exc), code="context_length_exceeded") from None
    except ValueError as exc:
        raise APIError(400, str(exc)) from None


async def collect_final(stream: RequestStream) -> RequestOutput:
    """The last output of a stream; 500 if the engine failed while serving it, 408 past its
    deadline."""
    final = None
    try:
        async for out in stream:
            final = out
    except EngineDeadError:
        raise APIError(500, "the engine failed while serving this request") from None
    except RequestTimeoutError as exc:
        raise APIError(408, str(exc), code="request_timeout") from None
    if final is None or any(c.finish_reason == "error" for c in final.outputs):
        raise APIError(500, "the engine failed while serving this request")
    return final


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's `usage`; `cached_tokens` are prompt tokens served from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def stream_error_chunk(exc: BaseException | None = None) -> bytes:
    """How an OpenAI stream reports a failure after it started: a `data:` chunk with `error`
    (408 for a request past its deadline, else 500)."""
    if isinstance(exc, RequestTimeoutError):
        return sse(openai_error_body(APIError(408, str(exc), code="request_timeout")))
    return sse(openai_error_body(APIError(500, "the engine failed while serving this request")))
