"""`tokenmill serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server.

Server flags are defined here; every engine flag comes from `EngineArgs.add_cli_args`. With
`--ray`, N copies of the same server run as Ray Serve replicas (`tokenmill/entrypoints/ray_serve.py`).
`plan_server` is the part both share: it checks the arguments and returns the app's config and
the factory of its engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder
    from tokenmill.entrypoints.server.app import ServerConfig

DEFAULT_MAX_QUEUE_LEN = 1024

logger = logging.getLogger("tokenmill.server")


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
    group.add_argument("--enable-weight-updates", action="store_true",
                       help="serve the RL routes (docs/rl.md): /pause, /resume, /reset_prefix_cache, "
                            "/update_weights_from_disk, /init_weights_update_group, "
                            "/update_weights_from_distributed, /collective_rpc (behind --api-key)")
    group.add_argument("--requests-while-paused", choices=("wait", "reject"), default="wait",
                       help="requests arriving while the engine is paused or asleep wait until it "
                            "resumes (default), or get 503 at once")
    group.add_argument("--uvicorn-log-level", default="warning",
                       choices=["critical", "error", "warning", "info", "debug", "trace"])


# `--ray`'s own flags (docs/scale-out.md): (flag, type, help). All default to None, "not given",
# so they can be refused without `--ray` and derived from the engine flags with it.
RAY_FLAGS = (
    ("--ray-address", str, "Ray cluster to join (e.g. auto, or ray://head:10001); default: the cluster "
                           "in $RAY_ADDRESS or one started on this machine, else start a local one"),
    ("--num-replicas", int, "replicas to run (default 1); with --max-replicas, how many to start with"),
    ("--min-replicas", int, "autoscaling: fewest replicas (default 1; 0 scales to zero)"),
    ("--max-replicas", int, "autoscaling: most replicas; giving it turns autoscaling on"),
    ("--target-ongoing-requests", float,
     "autoscaling: requests in flight per replica to aim for (default --max-num-seqs)"),
    ("--max-ongoing-requests", int, "requests Ray sends one replica at once; more wait in Ray's "
                                    "queue (default --max-num-seqs + --max-queue-len)"),
    ("--ray-num-gpus-per-replica", float, "GPUs per replica (default --tensor-parallel-size when the "
                                          "device is CUDA, or auto and the cluster has GPUs; else 0)"),
    ("--ray-num-cpus-per-replica", float, "CPUs Ray reserves per replica (default 1; on CPU clusters "
                                          "give --engine-threads + 1 so Ray does not pack more "
                                          "replicas than cores)"),
)


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("replicas on Ray Serve (--ray; needs `pip install 'tokenmill[ray]'`)")
    group.add_argument("--ray", action="store_true",
                       help="run the server as Ray Serve replicas behind Ray's HTTP proxy on --host/--port")
    for flag, kind, text in RAY_FLAGS:
        group.add_argument(flag, type=kind, default=None, help=text)


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    parser = subparsers.add_parser(
        "serve", help="run the OpenAI- and Anthropic-compatible HTTP server",
        description="Serve a model over HTTP. With no MODEL, the embedded SmolLM2-135M is served.")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model path or name (same as --model)")
    add_server_args(parser)
    add_ray_args(parser)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def configure_logging() -> None:
    """An operator needs the start-up lines (model, KV capacity, URL) and the periodic stats line
    even when the CLI's --log-level keeps everything else quiet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = min(logging.INFO, logging.getLogger().getEffectiveLevel())
    for name in ("tokenmill.server", "tokenmill.engine.core_client"):
        logging.getLogger(name).setLevel(level)


def run(args: argparse.Namespace) -> None:
    """Runs the server; exits the process with its exit code (non-zero if the engine died)."""
    configure_logging()
    if args.model_tag is not None:
        args.model = args.model_tag
    if args.ray:
        from tokenmill.entrypoints.ray_serve import run as run_on_ray

        sys.exit(run_on_ray(args))
    given = [flag for flag, _, _ in RAY_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None]
    if given:
        logger.error("cannot serve: %s needs --ray", ", ".join(given))
        sys.exit(2)
    from tokenmill.entrypoints.server.launch import serve

    try:
        plan = plan_server(args)
    except CannotServe as exc:
        logger.error("cannot serve: %s", exc)
        sys.exit(2)
    sys.exit(serve(plan.make_engine, plan.config, host=args.host, port=args.port,
                   log_level=args.uvicorn_log_level))


class CannotServe(Exception):
    """Arguments the server cannot run with (bad model, dtype or parser): one clear line, exit 2."""


@dataclass(frozen=True)
class ServerPlan:
    """What one server runs: the app's config, and the factory its lifespan calls for the engine
    (generation: an engine core process) or the embedder (in-process)."""
    config: ServerConfig
    make_engine: Callable[[], Awaitable[AsyncEngine | AsyncEmbedder]]


def plan_server(args: argparse.Namespace, served_at: str | None = None) -> ServerPlan:
    """Checks `args` before anything starts (so a typo is one line, not a traceback from the
    lifespan) and returns the plan. `served_at`: where the start-up line says the server is
    (default its URL). Raises `CannotServe`."""
    from tokenmill.entrypoints.server.app import ServerConfig

    api_key = args.api_key or os.environ.get("TOKENMILL_API_KEY") or None
    config = ServerConfig(api_key=api_key, max_body_bytes=args.max_request_body_bytes,
                          drain_timeout_s=args.drain_timeout, log_stats_interval_s=args.log_stats_interval,
                          tool_call_parser=args.tool_call_parser,
                          sleep_routes=bool(getattr(args, "enable_sleep_mode", False)),
                          weight_update_routes=bool(getattr(args, "enable_weight_updates", False)),
                          requests_while_paused=getattr(args, "requests_while_paused", "wait"))
    url = served_at or f"http://{args.host}:{args.port}"
    key_note = f"API key {'required' if api_key else 'not required'}"
    if _wants_embedding(args):
        return ServerPlan(config, _embedder_factory(args, url, key_note))
    return ServerPlan(config, _engine_factory(args, url, key_note))


def _engine_factory(args: argparse.Namespace, url: str, key_note: str):
    from tokenmill.config import EngineArgs
    from tokenmill.engine.async_engine import AsyncEngine

    engine_args = EngineArgs.from_cli_args(args)
    try:
        engine_config = engine_args.create_engine_config()
    except (ValueError, OSError) as exc:
        raise CannotServe(str(exc)) from None
    if args.tool_call_parser is not None:
        from tokenmill.entrypoints.tool_parsers import get_tool_parser

        try:
            get_tool_parser(args.tool_call_parser)
        except ValueError as exc:
            raise CannotServe(str(exc)) from None

    async def make_engine() -> AsyncEngine:
        engine = await AsyncEngine.from_engine_args(engine_args, max_queue_len=args.max_queue_len,
                                                    wedge_timeout_s=args.engine_wedge_timeout,
                                                    engine_threads=args.engine_threads,
                                                    config=engine_config)
        model = engine.config.model
        logger.info("model %s (served as %r), dtype %s, max_model_len %d, KV cache %d tokens",
                    model.model, engine.model_name, model.dtype, model.max_model_len,
                    engine.client.kv_capacity_tokens)
        logger.info("serving on %s (%s)", url, key_note)
        return engine

    return make_engine


def _wants_embedding(args: argparse.Namespace) -> bool:
    from tokenmill.engine.embedding_engine import is_embedding_model

    return args.task == "embed" or (args.task == "auto" and is_embedding_model(args.model))


def _embedder_factory(args: argparse.Namespace, url: str, key_note: str):
    """An embedding model runs inside the API process (no engine core: no KV cache, no decode
    loop); see tokenmill/entrypoints/openai/embeddings.py."""
    from tokenmill.engine.embedding_engine import is_embedding_model
    from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder

    if args.model is not None and not is_embedding_model(args.model):
        raise CannotServe(f"{args.model} is not an embedding model folder this engine runs (BERT family)")
    if args.dtype not in ("auto", "float32", "float", "bfloat16"):
        raise CannotServe(f"dtype {args.dtype} is not supported for embeddings (auto, float32, bfloat16)")

    async def make_embedder() -> AsyncEmbedder:
        embedder = await AsyncEmbedder.load(args.model, dtype=args.dtype, device=args.device,
                                            served_model_name=args.served_model_name,
                                            max_pending=args.max_queue_len)
        engine = embedder.engine
        logger.info("embedding model %s (served as %r), %d dimensions, max_model_len %d, %s on %s",
                    engine.model_path, embedder.model_name, engine.dimensions, engine.max_model_len,
                    str(engine.dtype).removeprefix("torch."), engine.device)
        logger.info("serving /v1/embeddings on %s (%s)", url, key_note)
        return embedder

    return make_embedder


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenmill.entrypoints.cli.serve ...`, for when the `tokenmill` command is absent."""
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
