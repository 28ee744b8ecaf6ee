"""POST /v1/embeddings, served by an `EmbeddingEngine` inside the API process.

An encoder has no KV cache and no decode loop, so it needs neither the engine-core process nor
its scheduler: `AsyncEmbedder` runs the model on one worker thread (torch releases the GIL, so the
event loop stays free) and batches across concurrent requests: whatever arrived while one forward
pass ran is tokenized and embedded together in the next one. A bad input fails only its own
request, never the neighbours it was batched with.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
from fastapi import Request
from fastapi.responses import Response
from pydantic import Field, field_validator

from tokenmill.engine.async_engine import QueueFullError
from tokenmill.entrypoints.openai.protocol import StrictModel, TokenId
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import RETRY_AFTER_S, new_id, unless_disconnected
from tokenmill.sampling_params import INT64_MAX

logger = logging.getLogger("tokenmill.server")

MAX_INPUTS_PER_REQUEST = 2048  # OpenAI's limit: bounds the work one request can queue
MAX_INPUTS_PER_PASS = 4096  # inputs merged from several requests into one worker call


EmbeddingInput = Union[
    str,
    Annotated[list[str], Field(min_length=1)],
    Annotated[list[TokenId], Field(min_length=1)],  # one prompt as token ids
    Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)],
]


class EmbeddingRequest(StrictModel):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=INT64_MAX)] | None = None
    user: str | None = None
    # vLLM's extra: keep this many tokens (-1: the model's maximum) instead of refusing long inputs.
    truncate_prompt_tokens: Annotated[int, Field(ge=-1, le=INT64_MAX)] | None = None

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: EmbeddingInput) -> list[str | list[int]]:
        """Normalizes to a list of texts / token-id lists."""
        if isinstance(value, str):
            items = [value]
        elif value and isinstance(value[0], int):
            items = [value]
        else:
            items = list(value)
        if len(items) > MAX_INPUTS_PER_REQUEST:
            raise ValueError(f"input has {len(items)} items; at most {MAX_INPUTS_PER_REQUEST} are allowed")
        empty = [i for i, x in enumerate(items) if isinstance(x, str) and not x]
        if empty:
            raise ValueError(f"input {empty[0]} is an empty string")
        return items


@dataclass(slots=True)
class EmbedResult:
    embeddings: list[list[float] | str]  # floats, or base64 of little-endian float32
    num_tokens: int


@dataclass(slots=True)
class _Job:
    inputs: list
    truncate_prompt_tokens: int | None
    dimensions: int | None
    encoding_format: str
    future: asyncio.Future


class AsyncEmbedder:
    """An `EmbeddingEngine` behind an asyncio queue. Create with `await AsyncEmbedder.load(...)` or
    from an engine (tests), then `start()` on the serving loop."""

    def __init__(self, engine: Any, model_name: str, aliases: set[str] | None = None,
                 max_pending: int = 1024) -> None:
        self.engine = engine
        self.model_name = model_name
        self.model_aliases = aliases or set()
        self.max_model_len: int = engine.max_model_len
        self.max_pending = max_pending
        # One thread: the model is not re-entrant (the tokenizer's truncation is per call state)
        # and one forward pass already uses every torch thread.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-embed")
        self._pending: list[_Job] = []
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @classmethod
    async def load(cls, model_path: str | None, *, dtype: str = "auto", device: str = "auto",
                   served_model_name: str | None = None, max_pending: int = 1024) -> "AsyncEmbedder":
        from tokenmill.engine.embedding_engine import EmbeddingEngine

        # Loading reads and packs the weights: seconds, kept off the event loop.
        engine = await asyncio.to_thread(EmbeddingEngine, model_path, dtype=dtype, device=device)
        base = engine.config.model.served_model_name  # "all-MiniLM-L6-v2" for the bundled model, else the folder
        name = served_model_name or model_path or base
        aliases = {base, engine.model_path} | ({model_path} if model_path else set())
        embedder = cls(engine, name, aliases - {name}, max_pending=max_pending)
        embedder.start()
        return embedder

    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def is_healthy(self) -> bool:
        return self._task is not None and not self._task.done()

    async def embed(self, inputs: list, *, truncate_prompt_tokens: int | None = None,
                    dimensions: int | None = None, encoding_format: str = "float") -> EmbedResult:
        """Raises `ValueError` (-> 400) for inputs the model refuses, `QueueFullError` (-> 429)."""
        if len(self._pending) >= self.max_pending:
            raise QueueFullError(f"server is at capacity ({len(self._pending)} embedding requests waiting); "
                                 "retry later")
        self.engine.validate_dimensions(dimensions)  # before queueing: a 400 costs no model time
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(inputs, truncate_prompt_tokens, dimensions, encoding_format, future))
        self._wakeup.set()
        return await future  # cancelled (client gone) before its turn: skipped by the worker

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                jobs, count = [], 0
                while self._pending and (not jobs or count + len(self._pending[0].inputs) <= MAX_INPUTS_PER_PASS):
                    job = self._pending.pop(0)
                    if not job.future.done():
                        jobs.append(job)
                        count += len(job.inputs)
                if not jobs:
                    continue
                try:
                    results = await loop.run_in_executor(self._executor, self._run, jobs)
                except Exception:  # noqa: BLE001 - a model failure fails this batch, not the server
                    logger.exception("embedding batch failed")
                    results = [RuntimeError("embedding failed")] * len(jobs)
                for job, result in zip(jobs, results):
                    if job.future.done():
                        continue
                    if isinstance(result, BaseException):
                        job.future.set_exception(result)
                    else:
                        job.future.set_result(result)

    def _run(self, jobs: list[_Job]) -> list[EmbedResult | Exception]:
        """On the worker thread: tokenize each job (its errors stay its own), embed all valid
        inputs in one call (the engine packs them by length), then split and encode per job. If
        that shared call fails, each job is embedded alone, so one bad input fails one request."""
        tokenized = [self._tokenize(job) for job in jobs]
        valid = [i for i, ids in enumerate(tokenized) if not isinstance(ids, Exception)]
        results: list[EmbedResult | Exception] = list(tokenized)
        try:
            for i, result in zip(valid, self._embed([jobs[i] for i in valid], [tokenized[i] for i in valid])):
                results[i] = result
        except Exception:  # noqa: BLE001 - isolated below
            logger.exception("embedding batch of %d requests failed; embedding them one by one", len(valid))
            for i in valid:
                try:
                    results[i] = self._embed([jobs[i]], [tokenized[i]])[0]
                except Exception:  # noqa: BLE001 - this request's own failure
                    logger.exception("embedding request failed")
                    results[i] = RuntimeError("embedding failed")
        return results

    def _tokenize(self, job: _Job) -> list[list[int]] | Exception:
        try:
            return self.engine.tokenize(job.inputs, job.truncate_prompt_tokens)[1]
        except ValueError as exc:  # written for users: lengths, vocabulary
            return exc
        except Exception:  # noqa: BLE001 - input the tokenizer cannot take is this request's fault
            logger.warning("embedding input could not be tokenized", exc_info=True)
            return ValueError("the input could not be tokenized")

    def _embed(self, jobs: list[_Job], tokenized: list[list[list[int]]]) -> list[EmbedResult]:
        from tokenmill.model.layers.pooler import truncate_and_normalize

        flat = [ids for job_ids in tokenized for ids in job_ids]
        emb = self.engine.embed_token_ids(flat, use_tqdm=False) if flat else None
        results = []
        start = 0
        for job, ids in zip(jobs, tokenized):
            rows = emb[start:start + len(ids)]
            start += len(ids)
            if job.dimensions is not None:
                rows = truncate_and_normalize(rows, job.dimensions)
            if job.encoding_format == "base64":
                # OpenAI's base64 is the raw little-endian float32 bytes of each vector.
                data = rows.float().numpy().astype("<f4")
                encoded: list = [base64.b64encode(row.tobytes()).decode() for row in data]
            else:
                encoded = rows.tolist()
            results.append(EmbedResult(encoded, sum(len(t) for t in ids)))
        return results

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        self._pending.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


def embedder_of(request: Request) -> AsyncEmbedder:
    embedder = getattr(request.app.state, "embedder", None)
    if embedder is None:
        raise APIError(400, "this server runs a generation model, which does not support the embeddings API; "
                            "serve an embedding model (tokenmill serve --task embed)", param="model")
    return embedder


def _check_model(embedder: AsyncEmbedder, model: str | None) -> str:
    if model is not None and model != embedder.model_name and model not in embedder.model_aliases:
        raise APIError(404, f"The model `{model[:200]}` does not exist.", code="model_not_found", param="model")
    return embedder.model_name


async def create_embedding(request: Request) -> Response:
    started = time.monotonic()
    body = await read_model(request, EmbeddingRequest)
    embedder = embedder_of(request)
    model = _check_model(embedder, body.model)
    try:
        result = await unless_disconnected(request, embedder.embed(
            body.input, truncate_prompt_tokens=body.truncate_prompt_tokens, dimensions=body.dimensions,
            encoding_format=body.encoding_format))
    except QueueFullError as exc:
        raise APIError(429, str(exc), headers={"retry-after": RETRY_AFTER_S}) from None
    except ValueError as exc:  # messages written for users: lengths, vocabulary, dimensions
        message = str(exc)
        param = "dimensions" if "dimensions" in message else "input"
        code = "context_length_exceeded" if "the model's maximum is" in message else None
        raise APIError(400, message, param=param, code=code) from None
    except RuntimeError:
        raise APIError(500, "the embedding model failed while serving this request") from None
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.prompt_tokens.inc(result.num_tokens)
        metrics.e2e.observe(time.monotonic() - started)
    payload = {
        "id": new_id("embd"), "object": "list", "model": model, "created": int(time.time()),
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(result.embeddings)],
        "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens},
    }
    # msgspec encodes thousands of floats several times faster than json, on the event loop.
    return Response(msgspec.json.encode(payload), media_type="application/json")
