"""`tokenmill serve [MODEL]`: the OpenAI- and Anthropic-compatible HTTP server, here or, with
`--ray`, as Ray Serve replicas (`tokenmill/entrypoints/ray_serve.py`). The flags and the plan both
run are in `serve_plan.py`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from tokenmill.entrypoints.cli.serve_plan import (
    RAY_FLAGS,
    CannotServe,
    build_serve_parser,
    configure_logging,
    plan_server,
)

logger = logging.getLogger("tokenmill.server")


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = build_serve_parser(subparsers)
    parser.set_defaults(func=run)
    return parser


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
                   log_level=args.uvicorn_log_level, ssl_keyfile=args.ssl_keyfile,
                   ssl_certfile=args.ssl_certfile, root_path=args.root_path or ""))


def main(argv: list[str] | None = None) -> None:
    """`python -m tokenmill.entrypoints.cli.serve ...`, for when the `tokenmill` command is absent."""
    parser = argparse.ArgumentParser(prog="tokenmill")
    add_parser(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
