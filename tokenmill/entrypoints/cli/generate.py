"""`tokenmill generate "prompt"`: one completion, streamed to the terminal as tokens arrive."""

from __future__ import annotations

import argparse
import sys

from tokenmill.config.sampling_args import add_sampling_args, sampling_params_from_args
from tokenmill.entrypoints.cli.startup import add_thread_arg, start_engine


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    parser = subparsers.add_parser("generate", help="complete a prompt (streams to stdout)")
    parser.add_argument("prompt", help="the text to continue")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user chat message")
    parser.add_argument("--n", type=int, default=1, help="samples (printed one after another)")
    add_thread_arg(parser)
    add_sampling_args(parser, default_max_tokens=128)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from tokenmill.sampling_params import RequestOutputKind

    engine = start_engine(args)
    prompt = args.prompt
    add_special = True
    if args.chat:
        prompt = engine.input_processor.render_chat([{"role": "user", "content": prompt}])
        add_special = False
    params = sampling_params_from_args(args, n=args.n, output_kind=RequestOutputKind.DELTA)
    try:
        engine.add_request("cli", prompt, params, add_special_tokens=add_special)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    texts: dict[int, str] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            for completion in output.outputs:
                if args.n == 1:
                    sys.stdout.write(completion.text)
                    sys.stdout.flush()
                else:
                    texts[completion.index] = texts.get(completion.index, "") + completion.text
    if args.n == 1:
        sys.stdout.write("\n")
    else:
        for index in sorted(texts):
            print(f"--- sample {index} ---\n{texts[index]}")
    return 0
