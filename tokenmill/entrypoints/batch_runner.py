"""`tokenmill run-batch -i requests.jsonl -o results.jsonl [MODEL]`: OpenAI Batch files, offline.

Input lines: `{"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions"
| "/v1/embeddings", "body": {...}}`. Output lines: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}`, OpenAI's format:
- a line that cannot be read as a request (bad JSON, missing fields, unknown url, a repeated
  custom_id) -> `response: null`, `error: {code, message, line}`;
- a request the API would answer 400 (bad body, prompt too long, ...) -> `response.status_code` 400
  with an OpenAI error body, `error: null`.
The rest of the file always goes on.

Durability: results are appended and flushed as each chunk finishes, so a crash loses at most the
chunk in flight. A rerun with the same output file reads it first and skips every custom_id (and
every unreadable line number) already answered, so each is answered exactly once. A torn last
line from a crash is cut off before appending.

The model work goes through injected backends, so the runner is plain file logic and testable with
fakes: a generator (`LLM`-like: `.generate(prompts, params, use_tqdm=)`, `.chat(conversations,
params, use_tqdm=, add_generation_prompt=, chat_template_kwargs=)` returning `RequestOutput`s) and
an embedder (`EmbeddingEngine`-like: `.embed(inputs, truncate_prompt_tokens=, use_tqdm=,
dimensions=)`). Each is built lazily by a factory, only if the file has lines that need it.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import struct
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError
from tqdm.auto import tqdm

from tokenmill.entrypoints.openai.logprobs import chat_logprobs, completion_logprobs
from tokenmill.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
URLS = (CHAT, COMPLETIONS, EMBEDDINGS)


class GenerateBackend(Protocol):
    def generate(self, prompts: list, sampling_params: list, use_tqdm: bool = ...) -> list: ...
    def chat(self, messages: list, sampling_params: list, use_tqdm: bool = ..., **kwargs: Any) -> list: ...


class EmbedBackend(Protocol):
    def embed(self, inputs: list, truncate_prompt_tokens: int | None = ..., use_tqdm: bool = ...,
              **kwargs: Any) -> list: ...


class BadRequest(ValueError):
    """A request the OpenAI API would answer with 400."""


@dataclass(slots=True)
class BatchLine:
    line_no: int  # 1-based, as editors count
    custom_id: str
    url: str
    body: dict


@dataclass(slots=True)
class BatchSummary:
    total_lines: int = 0
    skipped_done: int = 0  # answered by an earlier run
    succeeded: int = 0
    failed: int = 0  # 4xx responses and unreadable lines
    errors_by_line: dict[int, str] = field(default_factory=dict)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _error_body(message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}


# --- reading input and earlier output ----------------------------------------------------------

def parse_line(line_no: int, raw: str) -> BatchLine:
    """One input line -> BatchLine; raises ValueError with a message for the error line."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"line is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError("line must be a JSON object")
    custom_id, method, url, body = obj.get("custom_id"), obj.get("method", "POST"), obj.get("url"), obj.get("body")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("custom_id must be a non-empty string")
    if method != "POST":
        raise ValueError(f"method must be POST, got {method!r}")
    if url not in URLS:
        raise ValueError(f"url must be one of {', '.join(URLS)}, got {url!r}")
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    return BatchLine(line_no, custom_id, url, body)


def read_done(output_path: str) -> tuple[set[str], set[int]]:
    """custom_ids and unreadable-line numbers already answered in `output_path`; cuts a torn
    (newline-less) last line left by a crash so appended lines start on a fresh line."""
    done_ids: set[str] = set()
    done_lines: set[int] = set()
    if not os.path.exists(output_path):
        return done_ids, done_lines
    with open(output_path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            f.truncate(end)
    for raw in data[:end].decode("utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if obj.get("custom_id") is not None:
            done_ids.add(obj["custom_id"])
        elif isinstance(obj.get("error"), dict) and isinstance(obj["error"].get("line"), int):
            done_lines.add(obj["error"]["line"])
    return done_ids, done_lines


# --- turning bodies into backend calls and responses -------------------------------------------

def _validate(model_cls, body: dict):
    try:
        req = model_cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise BadRequest(f"{where}: {first.get('msg')}" if where else str(first.get("msg"))) from None
    if getattr(req, "stream", False):
        raise BadRequest("stream is not supported in batch files")
    return req


def _usage(prompt_tokens: int, completion_tokens: int | None = None) -> dict:
    if completion_tokens is None:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _chat_body(req: ChatCompletionRequest, out, model: str) -> dict:
    choices = [{
        "index": c.index,
        "message": {"role": "assistant", "content": c.text},
        "logprobs": chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0) if req.logprobs else None,
        "finish_reason": c.finish_reason,
    } for c in out.outputs]
    completion_tokens = sum(len(c.token_ids) for c in out.outputs)
    return {"id": _new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(len(out.prompt_token_ids), completion_tokens)}


def _completion_body(req: CompletionRequest, outs: list, model: str) -> dict:
    choices = []
    for p, out in enumerate(outs):
        for c in out.outputs:
            text = (out.prompt or "") + c.text if req.echo else c.text
            logprobs = completion_logprobs(c.token_ids, c.logprobs, req.logprobs) if req.logprobs is not None else None
            choices.append({"index": p * req.n + c.index, "text": text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason})
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    completion_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"id": _new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)}


def _embedding_args(body: dict) -> tuple[list, dict, str]:
    """Validate an embeddings body exactly as `/v1/embeddings` does -> (inputs as a list, embed
    kwargs, encoding_format)."""
    from tokenmill.entrypoints.openai.embeddings import EmbeddingRequest

    req = _validate(EmbeddingRequest, body)
    kwargs: dict[str, Any] = {"truncate_prompt_tokens": req.truncate_prompt_tokens}
    if req.dimensions is not None:
        kwargs["dimensions"] = req.dimensions
    return req.input, kwargs, req.encoding_format


def _encode_embedding(vec: list[float], fmt: str) -> list[float] | str:
    # OpenAI's base64: the float32 little-endian bytes of the vector.
    return base64.b64encode(struct.pack(f"<{len(vec)}f", *vec)).decode() if fmt == "base64" else vec


def _embedding_body(outs: list, fmt: str, model: str) -> dict:
    data = [{"object": "embedding", "index": i, "embedding": _encode_embedding(o.outputs.embedding, fmt)}
            for i, o in enumerate(outs)]
    return {"object": "list", "data": data, "model": model,
            "usage": _usage(sum(len(o.prompt_token_ids) for o in outs))}


def backend_model_name(backend: Any) -> str:
    """The name a server would report for this backend: an `LLM`'s served name, an embedding
    engine's `served_model_name` (set by the CLI) or its folder name."""
    if getattr(backend, "served_model_name", None):
        return backend.served_model_name
    config = getattr(getattr(backend, "engine", None), "config", None)
    if config is not None:
        return config.model.served_model_name or config.model.model
    path = getattr(backend, "model_path", None)
    if path:
        from tokenmill.engine.embedding_engine import default_embedding_model_path

        # The bundled model lives in a folder called "model": report what it is instead.
        return "all-MiniLM-L6-v2" if path == default_embedding_model_path() else os.path.basename(path.rstrip("/"))
    return "tokenmill"


# --- the runner --------------------------------------------------------------------------------

class BatchRunner:
    """Runs one batch file against lazily built backends.

    Args:
        make_generator: builds the chat/completions backend; None -> those lines get a 400.
        make_embedder: builds the embeddings backend; None -> those lines get a 400.
        model_name: the `model` reported in response bodies; None -> the name of the backend
            that answered the line (see `backend_model_name`).
        chunk_size: lines handed to a backend per call (one engine batch) and flushed together.
    """

    def __init__(self, make_generator: Callable[[], GenerateBackend] | None = None,
                 make_embedder: Callable[[], EmbedBackend] | None = None,
                 model_name: str | None = None, chunk_size: int = 64):
        self._make = {CHAT: make_generator, COMPLETIONS: make_generator, EMBEDDINGS: make_embedder}
        self._backends: dict[Callable, Any] = {}
        self.model_name = model_name
        self.chunk_size = max(1, chunk_size)

    def _backend(self, url: str):
        factory = self._make[url]
        if factory is None:
            raise BadRequest(f"this model does not serve {url}")
        if factory not in self._backends:
            self._backends[factory] = factory()
        return self._backends[factory]

    def _batch_key(self, line: BatchLine) -> tuple:
        """Lines with equal keys go to the backend in one call. Validates the body first: raises
        BadRequest / ValueError for a 400."""
        if self._make[line.url] is None:
            raise BadRequest(f"this model does not serve {line.url}")
        if line.url == EMBEDDINGS:
            _, kwargs, _ = _embedding_args(line.body)
            return line.url, json.dumps(kwargs, sort_keys=True)
        if line.url == CHAT:
            req = _validate(ChatCompletionRequest, line.body)
            if req.chat_template is not None:
                raise BadRequest("request-supplied chat templates are not allowed")
            return line.url, req.add_generation_prompt, json.dumps(req.chat_template_kwargs, sort_keys=True)
        _validate(CompletionRequest, line.body)
        return (line.url,)

    def _many(self, lines: list[BatchLine]) -> list[dict]:
        """Response bodies for lines with one batch key, from one backend call (the engine batches
        them); raises ValueError / TypeError when any request is bad."""
        url = lines[0].url
        backend = self._backend(url)
        name = self.model_name or backend_model_name(backend)
        if url == EMBEDDINGS:
            parsed = [_embedding_args(ln.body) for ln in lines]
            flat = [x for inputs, _, _ in parsed for x in inputs]
            outs = backend.embed(flat, use_tqdm=False, **parsed[0][1])  # one batch key: equal kwargs
            bodies, i = [], 0
            for inputs, _, fmt in parsed:
                bodies.append(_embedding_body(outs[i:i + len(inputs)], fmt, name))
                i += len(inputs)
            return bodies
        if url == CHAT:
            reqs = [_validate(ChatCompletionRequest, ln.body) for ln in lines]
            params = [r.to_sampling_params(default_max_tokens=None, logprobs=r.num_logprobs()) for r in reqs]
            convs = [[{"role": m.role, "content": m.text()} for m in r.messages] for r in reqs]
            outs = backend.chat(convs, params, use_tqdm=False, add_generation_prompt=reqs[0].add_generation_prompt,
                                chat_template_kwargs=reqs[0].chat_template_kwargs)
            return [_chat_body(r, o, name) for r, o in zip(reqs, outs)]
        reqs = [_validate(CompletionRequest, ln.body) for ln in lines]
        prompts, params, owners = [], [], []
        for k, r in enumerate(reqs):
            p = r.to_sampling_params(default_max_tokens=16, logprobs=r.logprobs)  # OpenAI's default max_tokens
            for prompt in r.prompts():
                prompts.append(prompt)
                params.append(p)
                owners.append(k)
        outs = backend.generate(prompts, params, use_tqdm=False)
        grouped: list[list] = [[] for _ in reqs]
        for k, o in zip(owners, outs):
            grouped[k].append(o)
        return [_completion_body(r, g, name) for r, g in zip(reqs, grouped)]

    def _run_chunk(self, lines: list[BatchLine]) -> list[tuple[BatchLine, int, dict]]:
        """(line, status, body) for every line. A failing batched call is retried line by line so
        one bad request cannot sink its neighbours. Errors other than ValueError / TypeError
        (the engine died) propagate: the run stops and a rerun resumes from the output file."""
        results: list[tuple[BatchLine, int, dict]] = []
        groups: dict[tuple, list[BatchLine]] = {}
        for ln in lines:
            try:
                groups.setdefault(self._batch_key(ln), []).append(ln)
            except (ValueError, TypeError) as e:
                results.append((ln, 400, _error_body(str(e))))
        for group in groups.values():
            try:
                results += [(ln, 200, body) for ln, body in zip(group, self._many(group))]
                continue
            except (ValueError, TypeError):
                pass  # find the culprit(s) below
            for ln in group:
                try:
                    results.append((ln, 200, self._many([ln])[0]))
                except (ValueError, TypeError) as e:
                    results.append((ln, 400, _error_body(str(e))))
        return results

    def run(self, input_path: str, output_path: str, use_tqdm: bool = True) -> BatchSummary:
        summary = BatchSummary()
        done_ids, done_lines = read_done(output_path)
        pending: list[BatchLine] = []
        seen: dict[str, int] = {}
        with open(output_path, "a", encoding="utf-8") as out:
            def write(obj: dict) -> None:
                out.write(json.dumps(obj, ensure_ascii=False) + "\n")

            with open(input_path, encoding="utf-8") as f:
                for line_no, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    summary.total_lines += 1
                    try:
                        ln = parse_line(line_no, raw)
                        if ln.custom_id in seen:
                            raise ValueError(f"duplicate custom_id {ln.custom_id!r} (first on line {seen[ln.custom_id]})")
                    except ValueError as e:
                        summary.errors_by_line[line_no] = str(e)
                        if line_no in done_lines:
                            summary.skipped_done += 1
                            continue
                        summary.failed += 1
                        write({"id": _new_id("batch_req"), "custom_id": None, "response": None,
                               "error": {"code": "invalid_request", "message": str(e), "line": line_no}})
                        continue
                    seen[ln.custom_id] = line_no
                    if ln.custom_id in done_ids:
                        summary.skipped_done += 1
                    else:
                        pending.append(ln)
            out.flush()

            bar = tqdm(total=len(pending), desc="Batch", unit="req", disable=not use_tqdm, dynamic_ncols=True)
            try:
                for start in range(0, len(pending), self.chunk_size):
                    for ln, status, body in self._run_chunk(pending[start:start + self.chunk_size]):
                        write({"id": _new_id("batch_req"), "custom_id": ln.custom_id,
                               "response": {"status_code": status, "request_id": _new_id("req"), "body": body},
                               "error": None})
                        if status == 200:
                            summary.succeeded += 1
                        else:
                            summary.failed += 1
                    out.flush()
                    os.fsync(out.fileno())  # a finished chunk survives a crash of the machine too
                    bar.update(min(self.chunk_size, len(pending) - start))
            finally:
                bar.close()
        return summary


# --- CLI ---------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `run-batch` (`subparsers` from `add_subparsers`)."""
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("run-batch", help="run an OpenAI Batch file (JSONL) offline")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model for all lines (an embedding model serves /v1/embeddings only)")
    p.add_argument("-i", "--input-file", required=True)
    p.add_argument("-o", "--output-file", required=True)
    p.add_argument("--embedding-model", default=None,
                   help="model for /v1/embeddings lines when MODEL is a generator (default: all-MiniLM-L6-v2)")
    p.add_argument("--chunk-size", type=int, default=64, help="lines per engine batch / flush")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> BatchSummary:
    from tokenmill.config import EngineArgs
    from tokenmill.engine.embedding_engine import is_embedding_model

    model = args.model_tag or args.model
    args.model = model
    make_generator = make_embedder = None
    if is_embedding_model(model):
        def make_embedder():
            from tokenmill.engine.embedding_engine import EmbeddingEngine
            engine = EmbeddingEngine(model, dtype=args.dtype)
            engine.served_model_name = args.served_model_name or model
            return engine
    else:
        def make_generator():
            import dataclasses
            from tokenmill.entrypoints.llm import LLM
            engine_args = EngineArgs.from_cli_args(args)
            return LLM(**{f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args)})

        def make_embedder():
            from tokenmill.engine.embedding_engine import EmbeddingEngine
            return EmbeddingEngine(args.embedding_model)
    # Each line reports the model that answered it (the generator's served name, or the embedder's).
    runner = BatchRunner(make_generator, make_embedder, chunk_size=args.chunk_size)
    summary = runner.run(args.input_file, args.output_file)
    print(f"{summary.total_lines} lines: {summary.succeeded} succeeded, {summary.failed} failed, "
          f"{summary.skipped_done} already done in {args.output_file}")
    return summary


def main(argv: list[str] | None = None) -> None:
    """`python3 -m tokenmill.entrypoints.batch_runner -i ... -o ...`, without the `tokenmill` command."""
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    import sys

    run(parser.parse_args(["run-batch", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
