"""The OpenAI-compatible routes: chat, completions, models, tokenize / detokenize."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenmill.entrypoints.openai.chat import create_chat_completion
from tokenmill.entrypoints.openai.common import encode, render_chat
from tokenmill.entrypoints.openai.completions import create_completion
from tokenmill.entrypoints.openai.embeddings import create_embedding
from tokenmill.entrypoints.openai.protocol import DetokenizeRequest, TokenizeRequest
from tokenmill.entrypoints.server.errors import APIError
from tokenmill.entrypoints.server.request_body import read_model
from tokenmill.entrypoints.server.serving import check_model, engine_model_names, engine_of

router = APIRouter()
router.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"])
router.add_api_route("/v1/completions", create_completion, methods=["POST"])
router.add_api_route("/v1/embeddings", create_embedding, methods=["POST"])

_STARTED = int(time.time())


def _served(request: Request):
    # Whichever model this server runs: the generation engine or the embedder.
    return getattr(request.app.state, "engine", None) or getattr(request.app.state, "embedder", None)


def _model_card(engine) -> dict:
    return {"id": engine.model_name, "object": "model", "created": _STARTED, "owned_by": "tokenmill",
            "root": engine.model_name, "max_model_len": engine.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": [_model_card(_served(request))]})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> JSONResponse:
    """`client.models.retrieve(id)`: the served model under any name it answers to, else 404."""
    engine = _served(request)
    if model_id not in engine_model_names(engine):
        raise APIError(404, f"The model `{model_id[:200]}` does not exist.", code="model_not_found",
                       param="model")
    return JSONResponse(_model_card(engine))


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    body = await read_model(request, TokenizeRequest)
    engine = engine_of(request)
    check_model(engine, body.model)
    if body.messages is not None:
        text = await render_chat(engine, [{"role": m.role, "content": m.text()} for m in body.messages],
                                 add_generation_prompt=body.add_generation_prompt)
        # The template already wrote any BOS it wants.
        tokens = await encode(engine, text, add_special_tokens=False)
    else:
        tokens = await encode(engine, body.prompt, add_special_tokens=body.add_special_tokens)
    return JSONResponse({"count": len(tokens), "max_model_len": engine.max_model_len, "tokens": tokens})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    body = await read_model(request, DetokenizeRequest)
    engine = engine_of(request)
    check_model(engine, body.model)
    bad = [t for t in body.tokens if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"token ids outside the vocabulary [0, {engine.vocab_size}): {bad[:10]}",
                       param="tokens")
    return JSONResponse({"prompt": await engine.run_input(engine.decode, body.tokens)})
