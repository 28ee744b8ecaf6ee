"""What `tokenmill serve` runs, shared by the local server (`cli/serve.py`) and Ray Serve replicas
(`entrypoints/ray_serve.py`): the server flags (every engine flag comes from
`EngineArgs.add_cli_args`), and `plan_server`, which checks the arguments and returns the app's
config and the factory of its engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.entrypoints.openai.embeddings import AsyncEmbedder
    from tokenmill.entrypoints.server.app import ServerConfig

DEFAULT_MAX_QUEUE_LEN = 1024
DEFAULT_MAX_QUEUE_WAIT_S = 30.0

logger = logging.getLogger("tokenmill.server")

# The parser names (listed in --help; checked against the registries when the server is planned).
_TOOL_PARSERS = ("hermes", "qwen3", "llama3_json", "deepseek_v3", "deepseek_v31", "kimi_k2", "minimax_m2",
                 "mistral")
_REASONING_PARSERS = ("deepseek_r1", "deepseek_v3", "qwen3", "kimi_k2", "minimax_m2", "minimax_m2_append_think")


def add_server_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default loopback; 0.0.0.0 exposes the server to the network)")
    group.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    group.add_argument("--api-key", default=None,
                       help="require this key (Authorization: Bearer or x-api-key) on every route but "
                            "/health; default: $TOKENMILL_API_KEY if set")
    group.add_argument("--drain-timeout", type=float, default=30.0,
                       help="on SIGTERM, seconds to let in-flight requests finish")
    group.add_argument("--max-queue-len", type=int, default=DEFAULT_MAX_QUEUE_LEN,
                       help="requests allowed to wait beyond --max-num-seqs; past it, 429 / 529")
    group.add_argument("--max-queue-wait", type=float, default=DEFAULT_MAX_QUEUE_WAIT_S,
                       help="seconds: a request projected to wait longer than this before the engine "
                            "starts on it (from the measured speed and the work ahead) gets 429 / 529 "
                            "at once, with retry-after; 0 turns this off")
    group.add_argument("--request-timeout", type=float, default=None,
                       help="seconds: a request still queued or running this long after it arrived is "
                            "aborted with 408 (a request's own `timeout` field wins); default none")
    group.add_argument("--max-request-body-bytes", type=int, default=8 * 1024 * 1024,
                       help="larger request bodies get 413")
    group.add_argument("--header-timeout", type=float, default=10.0,
                       help="seconds from a request's first byte to the end of its headers; slower "
                            "clients get 408 and are disconnected")
    group.add_argument("--body-timeout", type=float, default=30.0,
                       help="seconds for a request body to arrive after its headers; then 408")
    group.add_argument("--engine-wedge-timeout", type=float, default=120.0,
                       help="/health turns 503 when work is pending and no engine step finished for this long")
    group.add_argument("--engine-threads", type=int, default=None,
                       help="CPU threads for the engine core's math (default: all cores but one, "
                            "leaving one to the API process; or $OMP_NUM_THREADS if set)")
    group.add_argument("--tool-call-parser", default=None,
                       help="the model's tool-call format, for tool_choice auto: " + ", ".join(_TOOL_PARSERS)
                            + "; without it, tool_choice auto is refused (400)")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="vLLM's switch for tool_choice auto; needs --tool-call-parser, which "
                            "alone already turns it on here")
    group.add_argument("--reasoning-parser", default=None,
                       help="the model's thinking format, returned apart from the answer "
                            "(reasoning_content, Anthropic thinking blocks, Responses reasoning items): "
                            + ", ".join(_REASONING_PARSERS))
    group.add_argument("--response-role", default="assistant",
                       help="the role of chat completion replies when the request asks for a new "
                            "turn (add_generation_prompt)")
    group.add_argument("--log-stats-interval", type=float, default=10.0,
                       help="seconds between throughput log lines")
    group.add_argument("--disable-log-stats", action="store_true", help="no periodic throughput line")
    group.add_argument("--enable-log-requests", action="store_true",
                       help="log each request: id, prompt, sampling parameters, prompt token ids")
    group.add_argument("--disable-log-requests", action="store_true",
                       help="accepted for older vLLM command lines: requests are not logged by default")
    group.add_argument("--max-log-len", type=int, default=None,
                       help="with --enable-log-requests, log at most this many prompt characters "
                            "and token ids (default: all)")
    group.add_argument("--metrics-prefix", default="tokenmill", choices=("tokenmill", "vllm"),
                       help="name prefix of the /metrics series: vllm serves them under vLLM's "
                            "names for its dashboards and alerts")
    group.add_argument("--ssl-keyfile", default=None, help="serve HTTPS with this private key (PEM)")
    group.add_argument("--ssl-certfile", default=None, help="... and this certificate (PEM)")
    group.add_argument("--root-path", default=None,
                       help="URL prefix under which a proxy serves the app (FastAPI's root_path)")
    group.add_argument("--allowed-origins", default=None,
                       help="CORS: JSON list of origins whose pages may call the API from a browser, "
                            "e.g. '[\"https://app.example\"]' or '[\"*\"]' (default: none)")
    group.add_argument("--allowed-methods", default=None, help='CORS: JSON list of methods (default ["*"])')
    group.add_argument("--allowed-headers", default=None, help='CORS: JSON list of headers (default ["*"])')
    group.add_argument("--allow-credentials", action="store_true", help="CORS: allow credentials")
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
                       choices=["critical", "error", "warning", "info", "debug", "trace"],
                       help="uvicorn's own log level (HTTP server messages)")


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


def build_serve_parser(subparsers) -> argparse.ArgumentParser:
    """The `serve` subcommand's parser: its server, Ray and engine flags."""
    from tokenmill.config import EngineArgs

    parser = subparsers.add_parser(
        "serve", help="run the OpenAI- and Anthropic-compatible HTTP server",
        description="Serve a model over HTTP. With no MODEL, the embedded SmolLM2-135M is served.")
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="model path or name (same as --model)")
    add_server_args(parser)
    add_ray_args(parser)
    EngineArgs.add_cli_args(parser)
    return parser


def configure_logging() -> None:
    """An operator needs the start-up lines (model, KV capacity, URL) and the periodic stats line
    even when the CLI's --log-level keeps everything else quiet."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    level = min(logging.INFO, logging.getLogger().getEffectiveLevel())
    # Start-up steps: the model's config and its sizing, the GGUF conversion, the thread count.
    for name in ("tokenmill.server", "tokenmill.engine.core_client", "tokenmill.config",
                 "tokenmill.config.gguf_cache"):
        logging.getLogger(name).setLevel(level)


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
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise CannotServe("--enable-auto-tool-choice needs --tool-call-parser (" + ", ".join(_TOOL_PARSERS) + ")")
    _check_parsers(args)
    if bool(args.ssl_keyfile) != bool(args.ssl_certfile):
        raise CannotServe("HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for path in (args.ssl_keyfile, args.ssl_certfile):
        if path and not os.path.isfile(path):
            raise CannotServe(f"{path}: no such file")
    if args.max_log_len is not None and args.max_log_len < 0:
        raise CannotServe("--max-log-len must be >= 0")
    try:
        config = ServerConfig(api_key=api_key, max_body_bytes=args.max_request_body_bytes,
                              drain_timeout_s=args.drain_timeout, log_stats_interval_s=args.log_stats_interval,
                              tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                              response_role=args.response_role, metrics_prefix=args.metrics_prefix,
                              log_stats=not args.disable_log_stats, log_requests=args.enable_log_requests,
                              max_log_len=args.max_log_len,
                              allowed_origins=_json_list(args.allowed_origins, "--allowed-origins", ()),
                              allowed_methods=_json_list(args.allowed_methods, "--allowed-methods", ("*",)),
                              allowed_headers=_json_list(args.allowed_headers, "--allowed-headers", ("*",)),
                              allow_credentials=args.allow_credentials, header_timeout_s=args.header_timeout,
                              body_timeout_s=args.body_timeout, request_timeout_s=args.request_timeout,
                              sleep_routes=args.enable_sleep_mode, weight_update_routes=args.enable_weight_updates,
                              requests_while_paused=args.requests_while_paused)
    except ValueError as exc:
        raise CannotServe(str(exc)) from None
    scheme = "https" if args.ssl_certfile else "http"
    url = served_at or f"{scheme}://{args.host}:{args.port}{args.root_path or ''}"
    key_note = f"API key {'required' if api_key else 'not required'}"
    if _wants_embedding(args):
        return ServerPlan(config, _embedder_factory(args, url, key_note))
    return ServerPlan(config, _engine_factory(args, url, key_note))


def _check_parsers(args: argparse.Namespace) -> None:
    from tokenmill.entrypoints.reasoning import get_reasoning_parser
    from tokenmill.entrypoints.tool_parsers import get_tool_parser

    try:
        if args.tool_call_parser is not None:
            get_tool_parser(args.tool_call_parser)
        if args.reasoning_parser is not None:
            get_reasoning_parser(args.reasoning_parser)
    except ValueError as exc:
        raise CannotServe(str(exc)) from None
    if not args.response_role or not args.response_role.strip():
        raise CannotServe("--response-role must not be empty")


def _json_list(value: str | None, flag: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """vLLM takes these CORS flags as JSON lists; a bare origin is taken as a list of one."""
    if value is None:
        return default
    import json

    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = [value]
    if isinstance(parsed, str):
        parsed = [parsed]
    if not isinstance(parsed, list) or not all(isinstance(v, str) for v in parsed):
        raise CannotServe(f"{flag} takes a JSON list of strings, e.g. '[\"*\"]'")
    return tuple(parsed)


def _engine_factory(args: argparse.Namespace, url: str, key_note: str):
    from tokenmill.config import EngineArgs
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.entrypoints.threads import choose_cpu_threads, start_load_sample

    load = start_load_sample()  # spans reading the model's config (tokenmill/entrypoints/threads.py)
    # Requests arrive while others run: on a CPU the steps stay short (config/engine_args.py).
    engine_args = dataclasses.replace(EngineArgs.from_cli_args(args), serving=True)
    logger.info("loading %s", engine_args.model or "the embedded SmolLM2-135M-Instruct")
    try:
        engine_config = engine_args.create_engine_config()
    except (ValueError, OSError) as exc:
        raise CannotServe(str(exc)) from None
    # The API process (HTTP, tokenizing, detokenizing) keeps one core.
    threads = choose_cpu_threads(args.engine_threads, reserve=1, since=load)
    logger.info("engine core: %s", threads.reason)

    async def make_engine() -> AsyncEngine:
        engine = await AsyncEngine.from_engine_args(
            engine_args, max_queue_len=args.max_queue_len, wedge_timeout_s=args.engine_wedge_timeout,
            engine_threads=threads.num_threads, config=engine_config,
            max_queue_wait_s=args.max_queue_wait if args.max_queue_wait > 0 else None)
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
