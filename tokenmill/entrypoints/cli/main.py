"""The `tokenmill` command: generate, chat, serve, run-batch and bench.

Two vLLM habits work on every subcommand: `--log-level` after the subcommand as well as before it,
and `--config FILE.yaml`, whose keys are option names (`max-model-len: 2048` or `max_model_len`)
and whose values the command line overrides.
"""

from __future__ import annotations

import argparse
import logging
import sys


LOG_LEVEL_HELP = "Python logging level (debug, info, warning, error); debug also shows tracebacks"


def build_parser() -> argparse.ArgumentParser:
    from tokenmill.version import __version__

    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"tokenmill {__version__}")
    parser.add_argument("--log-level", default="WARNING", help=LOG_LEVEL_HELP)
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
    from tokenmill.benchmarks import concurrency, latency, moe, throughput
    throughput.add_parser(bench_sub)
    latency.add_parser(bench_sub)
    concurrency.add_parser(bench_sub)
    moe.add_parser(bench_sub)
    for module in ("serve", "embed", "structured", "prefix", "rl"):
        try:
            mod = __import__(f"tokenmill.benchmarks.{module}", fromlist=["add_parser"])
        except ImportError:
            continue  # optional parts (e.g. the server stack) not installed
        mod.add_parser(bench_sub)
    for command in _subcommand_parsers(parser):
        # SUPPRESS: given after the subcommand it overrides the top-level flag; absent, it does not.
        command.add_argument("--log-level", default=argparse.SUPPRESS, help=LOG_LEVEL_HELP)
        if command.prog.split()[1] != "bench":
            command.add_argument("--config", default=None, metavar="FILE.yaml",
                                 help="YAML file of options (`max-model-len: 2048`); flags given on "
                                      "the command line override it")
    return parser


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (bench throughput, ...) included, once each."""
    found: list[argparse.ArgumentParser] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.append(child)
                found.extend(_subcommand_parsers(child))
    return found


def expand_config_file(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`argv` with the options of its `--config FILE` inserted right after the subcommand, so the
    ones typed on the command line (parsed later) win, as in vLLM. Raises ValueError."""
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    if config_path is None:
        return argv
    commands = {name: p for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                for name, p in action.choices.items()}
    where = next((i for i, arg in enumerate(argv) if arg in commands), None)
    if where is None:
        raise ValueError("--config goes after a subcommand (tokenmill serve --config FILE)")
    import yaml

    try:
        with open(config_path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"--config {config_path}: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(f"--config {config_path}: expected a mapping of option names to values")
    return argv[:where + 1] + _options_as_argv(commands[argv[where]], values, config_path) + argv[where + 1:]


def _options_as_argv(parser: argparse.ArgumentParser, values: dict, source: str) -> list[str]:
    by_flag = {flag: action for action in parser._actions for flag in action.option_strings}
    out: list[str] = []
    for key, value in values.items():
        flag = "--" + str(key).replace("_", "-")
        action = by_flag.get(flag)
        if action is None or flag == "--config":
            raise ValueError(f"--config {source}: {parser.prog} has no option {flag}")
        if isinstance(action, argparse.BooleanOptionalAction):
            out.append(flag if value else "--no-" + flag[2:])
        elif action.nargs == 0:  # store_true / store_false
            if bool(value) == isinstance(action, argparse._StoreTrueAction):
                out.append(flag)
        elif isinstance(value, list):
            for item in value:
                out += [flag, str(item)]
        else:
            out += [flag, str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = expand_config_file(parser, argv)
    except ValueError as exc:
        parser.error(str(exc))
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
