"""Replicas on Ray Serve: N copies of the tokenmill server behind Ray's HTTP proxy.

Each replica is a Ray actor that builds the same FastAPI app as `tokenmill serve` (`build_app`
with the factory from `plan_server`), so it runs the same routes, guard, errors and lifespan, and
starts its own engine-core process. Ray's proxy routes every HTTP request, streams included, to
one replica; there is no load balancer of our own. docs/scale-out.md says how to run it.

    tokenmill serve --ray --num-replicas 2 ...                    # the CLI (`run` below)
    serve run tokenmill.entrypoints.ray_serve:app model=/m.gguf   # Ray's CLI / a Serve config

Ray is imported only here and only when used: `import tokenmill` and the plain server do not
need it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenmill.config.engine_args import DEFAULT_MAX_NUM_SEQS

if TYPE_CHECKING:
    from fastapi import FastAPI
    from ray.serve import Application

logger = logging.getLogger("tokenmill.server")

APP_NAME = "tokenmill"
DEPLOYMENT_NAME = "TokenmillDeployment"  # deploy/ray/rayservice.yaml overrides options by this name
# Every response names the replica that answered it (Ray's replica id), so an operator (and the
# e2e test) can see how requests spread and which replica a failing request was on.
REPLICA_HEADER = "x-tokenmill-replica"
MIN_RAY_VERSION = (2, 47)  # serve.ingress() takes a function that builds the app on the replica
# Ray replaces a replica after 3 failed checks in a row: ~15 s after its engine core died, not
# Ray's default ~30 s (a check only reads the replica's state).
HEALTH_CHECK_PERIOD_S = 5.0
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "tokenmill.entrypoints.ray_serve:proxy_middlewares"


@dataclass(frozen=True)
class ReplicaConfig:
    """How many replicas, how they scale, and what each reserves. `max_replicas` set means
    autoscaling (between `min_replicas` and `max_replicas`, starting at `num_replicas`)."""
    num_replicas: int
    min_replicas: int | None
    max_replicas: int | None
    target_ongoing_requests: float | None
    max_ongoing_requests: int
    num_gpus: float
    num_cpus: float
    graceful_shutdown_timeout_s: float

    def __post_init__(self) -> None:
        if self.num_replicas < 1 and not self.autoscaling:
            raise ValueError(f"--num-replicas must be >= 1, got {self.num_replicas}")
        if not self.autoscaling:
            if self.min_replicas is not None or self.target_ongoing_requests is not None:
                raise ValueError("--min-replicas and --target-ongoing-requests need --max-replicas "
                                 "(autoscaling)")
        else:
            lo = self.min_replicas
            if lo < 0 or self.max_replicas < max(lo, 1):
                raise ValueError(f"need 0 <= --min-replicas ({lo}) <= --max-replicas "
                                 f"({self.max_replicas}) and --max-replicas >= 1")
            if not lo <= self.num_replicas <= self.max_replicas:
                raise ValueError(f"--num-replicas ({self.num_replicas}) is where autoscaling starts: "
                                 f"it must lie in [--min-replicas, --max-replicas] = [{lo}, {self.max_replicas}]")
            if self.target_ongoing_requests is None or self.target_ongoing_requests <= 0:
                raise ValueError("--target-ongoing-requests must be > 0")
        if self.max_ongoing_requests < 1:
            raise ValueError(f"--max-ongoing-requests must be >= 1, got {self.max_ongoing_requests}")
        if self.num_gpus < 0 or self.num_cpus < 0:
            raise ValueError("--ray-num-gpus-per-replica and --ray-num-cpus-per-replica must be >= 0")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @classmethod
    def from_args(cls, args: argparse.Namespace, cluster_has_gpus: bool) -> "ReplicaConfig":
        """`tokenmill serve` flags -> config; what is not given derives from the engine flags."""
        autoscaling = args.max_replicas is not None
        min_replicas = (1 if args.min_replicas is None else args.min_replicas) if autoscaling else args.min_replicas
        num_replicas = args.num_replicas
        if num_replicas is None:
            num_replicas = max(min_replicas, 1) if autoscaling else 1
        target = args.target_ongoing_requests
        if autoscaling and target is None:
            target = float(args.max_num_seqs or DEFAULT_MAX_NUM_SEQS)  # scale out once replicas' batches are full on average
        on_cuda = args.device == "cuda" or (args.device == "auto" and cluster_has_gpus)
        num_gpus = args.ray_num_gpus_per_replica
        if num_gpus is None:
            num_gpus = float(args.tensor_parallel_size) if on_cuda else 0.0
        max_ongoing = args.max_ongoing_requests
        if max_ongoing is None:
            # What one replica admits itself (its batch plus its queue): past that its own 429 /
            # 529 would answer, so Ray queues the excess instead, for whichever replica frees first.
            max_ongoing = (args.max_num_seqs or DEFAULT_MAX_NUM_SEQS) + args.max_queue_len
        return cls(num_replicas=num_replicas, min_replicas=min_replicas, max_replicas=args.max_replicas,
                   target_ongoing_requests=target, max_ongoing_requests=max_ongoing, num_gpus=num_gpus,
                   num_cpus=1.0 if args.ray_num_cpus_per_replica is None else args.ray_num_cpus_per_replica,
                   graceful_shutdown_timeout_s=args.drain_timeout)

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of `serve.deployment`."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        }
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "initial_replicas": self.num_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}
        else:
            options["num_replicas"] = self.num_replicas
        return options


class ReplicaHeader:
    """Pure ASGI (streams pass through untouched): adds `REPLICA_HEADER: replica_id` to every
    HTTP response."""

    def __init__(self, app, replica_id: str) -> None:
        self.app = app
        self._header = (REPLICA_HEADER.encode(), replica_id.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_header(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), self._header]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class ReplicaLostErrors:
    """Runs in Ray's HTTP proxy (`proxy_middlewares`), around every request. When a replica dies
    mid-request, Ray's proxy ends the response unfinished: a plain-text 500 if nothing was sent
    yet, a cut connection mid-stream. This finishes it in the API's own format instead: a 500
    error body (OpenAI or Anthropic by path), or, in a stream that has started, the API's SSE error
    event and a clean end of the body. Complete responses pass through untouched; after the client
    hung up, uvicorn drops what is sent."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = {"start": None, "done": False}

        async def tracking_send(message) -> None:
            if message["type"] == "http.response.start":
                sent["start"] = message
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["done"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001 - answered below; the proxy logged the cause
            logger.warning("request on %s failed in the proxy", scope["path"])
        if sent["done"]:
            return
        await self._finish(scope, receive, send, sent["start"])

    @staticmethod
    async def _finish(scope, receive, send, start) -> None:
        from tokenmill.entrypoints.server.errors import APIError, error_response, stream_error_event

        err = APIError(500, "the replica serving this request failed")
        if start is None:
            await error_response(scope["path"], err)(scope, receive, send)
        elif dict(start.get("headers", ())).get(b"content-type", b"").startswith(b"text/event-stream"):
            await send({"type": "http.response.body", "body": stream_error_event(scope["path"], err),
                        "more_body": False})
        # else: a plain body cut short (its length was promised): the server cuts the connection


def proxy_middlewares() -> list:
    """`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=tokenmill.entrypoints.ray_serve:proxy_middlewares`:
    Ray's proxies call this at start-up for the middlewares to wrap their app in."""
    from starlette.middleware import Middleware

    return [Middleware(ReplicaLostErrors)]


def build_replica_app(args: argparse.Namespace) -> "FastAPI":
    """Runs on each replica, in its actor process: the `tokenmill serve` app for `args`. Its
    lifespan (run by Ray) starts this replica's engine core."""
    from ray import serve

    from tokenmill.entrypoints.cli.serve_plan import configure_logging, plan_server
    from tokenmill.entrypoints.server.app import build_app

    configure_logging()
    replica_id = serve.get_replica_context().replica_id.unique_id
    plan = plan_server(args, served_at=f"Ray Serve replica {replica_id}")
    app = build_app(plan.config, plan.make_engine)
    app.add_middleware(ReplicaHeader, replica_id=replica_id)
    return app


def build_application(args: argparse.Namespace, cluster_has_gpus: bool | None = None) -> "Application":
    """The Serve application for `tokenmill serve` flags: one deployment, `DEPLOYMENT_NAME`.
    `cluster_has_gpus` (for the default GPUs per replica) is asked of Ray when not given."""
    _require_ray()
    from ray import serve

    if cluster_has_gpus is None:
        cluster_has_gpus = _cluster_has_gpus()
    options = ReplicaConfig.from_args(args, cluster_has_gpus).deployment_options()

    def build_app_on_replica() -> "FastAPI":  # pickled with `args`; called in each replica
        return build_replica_app(args)

    @serve.ingress(build_app_on_replica)
    class TokenmillDeployment:
        async def check_health(self) -> None:
            """Ray calls this periodically; raising makes Ray replace the replica (a dead or
            wedged engine core; the replica's in-flight requests have already failed)."""
            from tokenmill.entrypoints.server.app import is_serving

            if not is_serving(self.app):
                raise RuntimeError("the engine core is dead or wedged")

    return serve.deployment(TokenmillDeployment, name=DEPLOYMENT_NAME, **options).bind()


def app(args: dict[str, Any]) -> "Application":
    """The application builder Ray's config names (`import_path: tokenmill.entrypoints.ray_serve:app`,
    `serve run tokenmill.entrypoints.ray_serve:app model=... num_replicas=2`). `args` holds
    `tokenmill serve` flags by their long names, `-` or `_` (`model`, `max_model_len`,
    `enable_prefix_caching: false`, `max_replicas`, ...). The proxy's host and port come from the
    Serve config, not from here; options under `deployments:` there override ours."""
    return build_application(parse_app_args(args))


def parse_app_args(args: dict[str, Any]) -> argparse.Namespace:
    """`{"model": "/m", "max_model_len": 4096}` -> the Namespace `tokenmill serve --model /m
    --max-model-len 4096` parses to. Raises ValueError naming what it rejects."""
    from tokenmill.entrypoints.cli.serve_plan import build_serve_parser

    parser = argparse.ArgumentParser(prog="tokenmill")
    options = build_serve_parser(parser.add_subparsers(dest="command"))._option_string_actions
    argv: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None:
            raise ValueError(f"unknown tokenmill serve argument {key!r}")
        if action.nargs == 0:  # a switch: true / false (YAML booleans, or strings from `serve run`)
            on = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
            if on:
                argv.append(flag)
            elif "--no-" + flag[2:] in options:
                argv.append("--no-" + flag[2:])
        elif value is not None:
            argv += [flag, str(value)]
    try:
        namespace = parser.parse_args(["serve", *argv])
    except SystemExit:  # argparse has printed what it rejects
        raise ValueError(f"invalid tokenmill serve arguments: {' '.join(argv)}") from None
    if namespace.model_tag is not None:
        namespace.model = namespace.model_tag
    return namespace


def run(args: argparse.Namespace) -> int:
    """`tokenmill serve --ray`: joins or starts a Ray cluster, deploys the application, and keeps
    it up until SIGINT / SIGTERM, which delete it (replicas drain for `--drain-timeout`)."""
    from tokenmill.entrypoints.cli.serve_plan import CannotServe, plan_server

    try:
        _require_ray()
        ReplicaConfig.from_args(args, cluster_has_gpus=False)  # flag errors before a cluster starts
        if args.ray_address is None:
            # Replicas on this machine see the same files: check the model here, so a typo is one
            # line instead of replicas that fail to start over and over.
            plan_server(args)
    except (CannotServe, ImportError, ValueError) as exc:
        logger.error("cannot serve: %s", exc)
        return 2
    import ray
    from ray import serve

    # Inherited by the processes of a cluster this starts, so its proxies load `proxy_middlewares`;
    # a cluster that is already running needs it in its own environment (docs/scale-out.md).
    os.environ.setdefault(PROXY_CALLBACK_ENV, PROXY_CALLBACK)
    try:
        ray.init(address=args.ray_address, logging_level=logging.WARNING)
    except ConnectionError as exc:
        logger.error("cannot serve: %s", exc)
        return 2
    try:
        application = build_application(args)
        serve.start(http_options={"host": args.host, "port": args.port})
        try:
            # Waits until every replica is up; Ctrl-C / SIGTERM meanwhile stop it (Ray's handlers).
            serve.run(application, name=APP_NAME, route_prefix="/", blocking=False)
        except RuntimeError:  # Ray has logged each replica's failure above
            logger.error("cannot serve: the replicas failed to start")
            return 1
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        logger.info("Ray Serve application %r is up on http://%s:%d", APP_NAME, args.host, args.port)
        while not stop.wait(1.0):
            pass
        logger.info("stopping: deleting the application (replicas drain up to %.0fs)", args.drain_timeout)
        serve.delete(APP_NAME)
        return 0
    finally:
        ray.shutdown()  # stops the cluster if ray.init started it; else only disconnects


def _require_ray() -> None:
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray Serve: pip install 'tokenmill[ray]'") from None
    version = tuple(int(p) for p in ray.__version__.split(".")[:2])
    if version < MIN_RAY_VERSION:
        raise ImportError(f"--ray needs ray[serve] >= {'.'.join(map(str, MIN_RAY_VERSION))}, "
                          f"found {ray.__version__}")


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
