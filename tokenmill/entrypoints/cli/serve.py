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
    from tokenmill.entrypoints.server.app import ServerConfig
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
    engine_args = EngineArgs.from_cli_args(args)
    try:
        # Resolve the model before uvicorn starts, so a typo is one clear line, not a traceback.
        engine_config = engine_args.create_engine_config()
    except (ValueError, OSError) as exc:
        logger.error("cannot serve: %s", exc)
        sys.exit(2)
    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    if args.tool_call_parser is not None:
        from tokenmill.entrypoints.tool_parsers import get_tool_parser

        try:
            get_tool_parser(args.tool_call_parser)
        except ValueError as exc:
            logger.error("cannot serve: %s", exc)
            sys.exit(2)
    config = ServerConfig(api_key=api_key, max_body_bytes=args.max_request_body_bytes,
                          drain_timeout_s=args.drain_timeout, log_stats_interval_s=args.log_stats_interval,
                          tool_call_parser=args.tool_call_parser)

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


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenmill.entrypoints.cli.serve ...`, for when the `tokenmill` command is absent."""
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
