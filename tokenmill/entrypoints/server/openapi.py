"""The OpenAPI document (`/openapi.json`, browsable at `/docs`), built from the request models.

The handlers read their bodies themselves (`request_body.read_model`: size, content type and work
caps before parsing), so FastAPI cannot see the models from their signatures; the table below
names each operation's model, and every status it can answer, in the format of its API. A fuzzer
such as schemathesis reads this document: it must promise no more and no less than the server does.
It is built on the first request, once the engine is up, so `model` lists the names this server
answers to and each operation carries a working example.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tokenmill.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from tokenmill.entrypoints.openai.embeddings import EmbeddingRequest
from tokenmill.entrypoints.openai.responses.protocol import ResponsesRequest
from tokenmill.entrypoints.openai.protocol import (
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
)

# (path, method) -> (request model, API whose error format it speaks, what it does): "generate"
# admits work to the engine (so it may be refused as overloaded) and may stream.
OPERATIONS: dict[tuple[str, str], tuple[type[BaseModel], str, str]] = {
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, "openai", "generate"),
    ("/v1/completions", "post"): (CompletionRequest, "openai", "generate"),
    ("/v1/embeddings", "post"): (EmbeddingRequest, "openai", "embed"),
    ("/tokenize", "post"): (TokenizeRequest, "openai", "tokenize"),
    ("/detokenize", "post"): (DetokenizeRequest, "openai", "tokenize"),
    ("/v1/responses", "post"): (ResponsesRequest, "openai", "generate"),
    ("/v1/messages", "post"): (MessagesRequest, "anthropic", "generate"),
    ("/v1/messages/count_tokens", "post"): (CountTokensRequest, "anthropic", "tokenize"),
}
_BODY_ERRORS = {
    "400": "invalid request (field, JSON, context length, or a route this model does not serve)",
    "404": "unknown model", "408": "body not received in time, or the request's timeout passed",
    "413": "body over the byte limit or the JSON work limit", "415": "Content-Type is not application/json",
    "500": "the engine failed while serving the request",
}
_ALWAYS_ERRORS = {"401": "missing or wrong API key", "503": "draining after SIGTERM, or the engine is gone"}
_OVERLOADED = {
    ("openai", "generate"): ("429", "admission queue full or projected wait too long (retry-after)"),
    ("anthropic", "generate"): ("529", "admission queue full or projected wait too long (retry-after)"),
    ("openai", "embed"): ("429", "too many embedding requests waiting (retry-after)"),
}

# One server-sent event (`stream: true`): `data` is a JSON object or OpenAI's final "[DONE]";
# Anthropic names each event.
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}
_OPENAI_ERROR = {
    "type": "object", "required": ["error"],
    "properties": {"error": {"type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
_ANTHROPIC_ERROR = {
    "type": "object", "required": ["type", "error"],
    "properties": {"type": {"const": "error"}, "error": {"type": "object", "required": ["type", "message"],
                                                         "properties": {"type": {"type": "string"},
                                                                        "message": {"type": "string"}}}},
}


def _error(description: str, api: str) -> dict[str, Any]:
    name = "OpenAIError" if api == "openai" else "AnthropicError"
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}}


def _post_operation(ref: str, api: str, kind: str) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if kind == "generate":
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    responses = {"200": {"description": "the result (with `stream`: server-sent events)", "content": ok}}
    errors = {**_BODY_ERRORS, **_ALWAYS_ERRORS}
    if (api, kind) in _OVERLOADED:
        errors.update([_OVERLOADED[api, kind]])
    for status, description in sorted(errors.items()):
        responses[status] = _error(description, api)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {"$ref": ref}}}},
            "responses": responses}


def _example(model: type[BaseModel], served: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": "Say hello."}]
    return {
        ChatCompletionRequest: {"model": served, "messages": messages, "max_tokens": 8},
        CompletionRequest: {"model": served, "prompt": "Once upon a time", "max_tokens": 8},
        EmbeddingRequest: {"model": served, "input": ["a sentence to embed"]},
        TokenizeRequest: {"model": served, "prompt": "Hello world"},
        DetokenizeRequest: {"model": served, "tokens": [1, 2, 3]},
        MessagesRequest: {"model": served, "max_tokens": 8, "messages": messages},
        ResponsesRequest: {"model": served, "input": "Say hello.", "max_output_tokens": 8},
        CountTokensRequest: {"model": served, "messages": messages},
    }[model]


def _served_names(app: FastAPI) -> list[str]:
    engine = getattr(app.state, "engine", None) or getattr(app.state, "embedder", None)
    if engine is None:
        return []
    return [engine.model_name, *sorted(set(getattr(engine, "model_aliases", ())) - {engine.model_name})]


def build_openapi(app: FastAPI, api_key_required: bool) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="OpenAI- and Anthropic-compatible LLM server (tokenmill).")
    names, defs = models_json_schema([(model, "validation") for model, _, _ in OPERATIONS.values()],
                                     ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas.update(defs.get("$defs", {}))
    schemas["OpenAIError"] = _OPENAI_ERROR
    schemas["AnthropicError"] = _ANTHROPIC_ERROR
    served = _served_names(app)
    for path in _unserved_paths(app):
        schema["paths"].pop(path, None)
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            if (path, method) in OPERATIONS:
                model, api, kind = OPERATIONS[path, method]
                ref = names[model, "validation"]["$ref"]
                operation.update(_post_operation(ref, api, kind))
                if served:
                    body = operation["requestBody"]["content"]["application/json"]
                    body["example"] = _example(model, served[0])
                    _only_served_models(schemas[ref.rsplit("/", 1)[1]], served)
            else:
                operation["responses"] = _get_responses(path)
    if api_key_required:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        schema["security"] = [{"bearer": []}, {"apiKey": []}]
        schema["paths"]["/health"]["get"]["security"] = []
    return schema


def _unserved_paths(app: FastAPI) -> set[str]:
    """Routes that only answer "this server runs another kind of model" (400) here."""
    engine, embedder = getattr(app.state, "engine", None), getattr(app.state, "embedder", None)
    embedding_paths = {path for (path, _), (_, _, kind) in OPERATIONS.items() if kind == "embed"}
    if engine is not None:
        return embedding_paths
    if embedder is not None:
        return {path for path, _ in OPERATIONS} - embedding_paths
    return set()


def _only_served_models(model_schema: dict[str, Any], served: list[str]) -> None:
    """`model` may name only this server's model (any other name is a 404)."""
    prop = model_schema.get("properties", {}).get("model")
    if prop is None:
        return
    names = {"type": "string", "enum": served}
    nullable = any(option.get("type") == "null" for option in prop.get("anyOf", ()))
    prop.pop("type", None)
    prop["anyOf"] = [names, {"type": "null"}] if nullable else [names]


def _get_responses(path: str) -> dict[str, Any]:
    if path == "/health":
        return {"200": {"description": "serving"},
                "503": {"description": "draining, engine not started, dead or wedged"}}
    if path == "/metrics":
        ok = {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}
    else:
        ok = {"description": "the result", "content": {"application/json": {"schema": {"type": "object"}}}}
    responses = {"200": ok, **{status: _error(d, "openai") for status, d in _ALWAYS_ERRORS.items()}}
    if "{" in path:  # a route that names a resource (`/v1/models/{model_id}`)
        responses["404"] = _error("no such resource on this server", "openai")
    return responses


def install_openapi(app: FastAPI, api_key_required: bool) -> None:
    """Serves `build_openapi` (built once, on first request) at `app.openapi_url`."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, api_key_required)
        return app.openapi_schema

    app.openapi = openapi
