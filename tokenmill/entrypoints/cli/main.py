"""The `tokenmill` command: generate, chat, serve, run-batch and bench."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.version import __version__

    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from tokenmill.entrypoints.cli import chat, generate
    generate.add_parser(sub)
    chat.add_parser(sub)
    # The server stack (fastapi, pydantic, zmq) is optional for offline use (e.g. the GPU images).
    for module in ("tokenmill.entrypoints.cli.serve", "tokenmill.entrypoints.batch_runner"):
        try:
            __import__(module, fromlist=["add_parser"]).add_parser(sub)
        except ImportError:
            pass

    bench = sub.add_parser("bench", help="benchmarks (each prints tokenmill and its baseline side by side)")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    from tokenmill.benchmarks import latency, throughput
    throughput.add_parser(bench_sub)
    latency.add_parser(bench_sub)
    for module in ("serve", "embed", "structured", "prefix", "rl"):
        try:
            mod = __import__(f"tokenmill.benchmarks.{module}", fromlist=["add_parser"])
        except ImportError:
            continue  # optional parts (e.g. the server stack) not installed
        mod.add_parser(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "model_tag", None) and not getattr(args, "model", None):
        args.model = args.model_tag
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        result = func(args)
    except ValueError as exc:
        # What the user can fix (no such model, too little GPU memory, a bad setting): the message
        # names the fix, so print it alone; `--log-level debug` keeps the traceback.
        if str(args.log_level).upper() == "DEBUG":
            raise
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
