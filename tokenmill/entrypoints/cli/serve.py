"""`tokenmill serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server.

Server flags are defined here; every engine flag comes from `EngineArgs.add_cli_args`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

DEFAULT_MAX_QUEUE_LEN = 1024


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default loopback; 0.0.0.0 exposes the server to the network)")
    group.add_argument("--port", type=int, default=8000)
    group.add_argument("--api-key", default=None,
                       help="require this key (Authorization: Bearer or x-api-key) on every route but "
                            "/health; default: $TOKENMILL_API_KEY if set")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let in-flight requests finish")
    group.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN,
                       help="requests allowed to wait beyond --max-num-seqs; past it, 429 / 529")
    group.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024,
                       help="larger request bodies get 413")
    group.add_argument("--engine-wedge-timeout", type=float, default=120.0,
                       help="/health turns 503 when work is pending and no engine step finished for this long")
    group.add_argument("--engine-threads", type=int, default=None,
                       help="CPU threads for the engine core's math (default: all cores but one, "
                            "leaving one to the API process; or $OMP_NUM_THREADS if set)")
    group.add_argument("--tool-call-parser", default=None,
                       help="how to find tool calls in the model's text for tool_choice auto: "
                            "hermes (also qwen) or llama3_json; without it, such text is content")
    group.add_argument("--log-stats-interval", type=float, default=10.0,
                       help="seconds between throughput log lines")
    group.add_argument("--task", default="auto", choices=["auto", "generate", "embed"],
                       help="embed: serve /v1/embeddings with an embedding model (no MODEL: the bundled "
                            "all-MiniLM-L6-v2); auto: embed when MODEL is an embedding model")
    group.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    parser = subparsers.add_parser(
        "serve", help="run the OpenAI- and Anthropic-compatible HTTP server",
        description="Serve a model over HTTP. With no MODEL, the embedded SmolLM2-135M is served.")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model path or name (same as --model)")
    add_server_args(parser)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> None:
    """Runs the server; exits the process with its exit code (non-zero if the engine died)."""
    from tokenmill.config import EngineArgs
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.entrypoints.server.launch import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # An operator needs the start-up lines (model, KV capacity, URL) and the periodic stats line
    # even when the CLI's --log-level keeps everything else quiet.
    level = min(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("tokenmill.server", "tokenmill.engine.core_client"):
        logging.getLogger(name).setLevel(level)
    logger = logging.getLogger("tokenmill.server")
    if args.model_tag is not None:
        args.model = args.model_tag
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    if _wants_embedding(args):
        _serve_embeddings(args, api_key, logger)
    engine_args = EngineArgs.from_cli_args(args)
    try:
        # Resolve the model before uvicorn starts, so a typo is one clear line, not a traceback.
        engine_config = engine_args.create_engine_config()
    except (ValueError, OSError) as exc:
        logger.error("cannot serve: %s", exc)
        sys.exit(2)
    if args.tool_call_parser is not None:
        from tokenmill.entrypoints.tool_parsers import get_tool_parser

        try:
            get_tool_parser(args.tool_call_parser)
        except ValueError as exc:
            logger.error("cannot serve: %s", exc)
            sys.exit(2)
    config = _server_config(args, api_key)

    async def make_engine() -> AsyncEngine:
        engine = await AsyncEngine.from_engine_args(engine_args, max_queue_len=args.max_queue_len,
                                                    wedge_timeout_s=args.engine_wedge_timeout,
                                                    engine_threads=args.engine_threads,
                                                    config=engine_config)
        model = engine.config.model
        logger.info("model %s (served as %r), dtype %s, max_model_len %d, KV cache %d tokens",
                    model.model, engine.model_name, model.dtype, model.max_model_len,
                    engine.client.kv_capacity_tokens)
        logger.info("serving on http://%s:%d (API key %s)", args.host, args.port,
                    "required" if api_key else "not required")
        return engine

    sys.exit(serve(make_engine, config, host=args.host, port=args.port, log_level=args.uvicorn_log_level))


def _wants_embedding(args: argparse.Namespace) -> bool:
    from tokenmill.engine.embedding_engine import is_embedding_model

    return args.task == "embed" or (args.task == "auto" and is_embedding_model(args.model))


def _server_config(args: argparse.Namespace, api_key: str | None):
    from tokenmill.entrypoints.server.app import ServerConfig

    return ServerConfig(api_key=api_key, max_body_bytes=args.max_request_body_bytes,
                        drain_timeout_s=args.drain_timeout, log_stats_interval_s=args.log_stats_interval,
                        tool_call_parser=args.tool_call_parser)


def _serve_embeddings(args: argparse.Namespace, api_key: str | None, logger: logging.Logger) -> None:
    """An embedding model runs inside the API process (no engine core: no KV cache, no decode
    loop); see tokenmill/entrypoints/openai/embeddings.py. Exits the process."""
    from tokenmill.engine.embedding_engine import is_embedding_model
    from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder
    from tokenmill.entrypoints.server.launch import serve

    # Refuse clearly before uvicorn starts, rather than with a traceback from the lifespan.
    if args.model is not None and not is_embedding_model(args.model):
        logger.error("cannot serve: %s is not an embedding model folder this engine runs (BERT family)",
                     args.model)
        sys.exit(2)
    if args.dtype not in ("auto", "float32", "float", "bfloat16"):
        logger.error("cannot serve: dtype %s is not supported for embeddings (auto, float32, bfloat16)",
                     args.dtype)
        sys.exit(2)

    async def make_embedder() -> AsyncEmbedder:
        embedder = await AsyncEmbedder.load(args.model, dtype=args.dtype, device=args.device,
                                            served_model_name=args.served_model_name,
                                            max_pending=args.max_queue_len)
        engine = embedder.engine
        logger.info("embedding model %s (served as %r), %d dimensions, max_model_len %d, %s on %s",
                    engine.model_path, embedder.model_name, engine.dimensions, engine.max_model_len,
                    str(engine.dtype).removeprefix("torch."), engine.device)
        logger.info("serving /v1/embeddings on http://%s:%d (API key %s)", args.host, args.port,
                    "required" if api_key else "not required")
        return embedder

    sys.exit(serve(make_embedder, _server_config(args, api_key), host=args.host, port=args.port,
                   log_level=args.uvicorn_log_level))


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenmill.entrypoints.cli.serve ...`, for when the `tokenmill` command is absent."""
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
