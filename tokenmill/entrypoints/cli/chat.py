"""`tokenmill chat`: an interactive chat in the terminal, replies streamed token by token."""

from __future__ import annotations

import argparse
import sys

from tokenmill.entrypoints.cli.sampling_args import add_sampling_args, sampling_params_from_args

HELP = "Commands: /reset clears the conversation, /exit (or Ctrl-D) quits."


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    parser = subparsers.add_parser("chat", help="chat with the model in the terminal")
    parser.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(parser, default_max_tokens=512)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import RequestOutputKind

    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
    params = sampling_params_from_args(args, output_kind=RequestOutputKind.DELTA)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"tokenmill chat - {engine.config.model.served_model_name}. {HELP}")
    turn = 0
    while True:
        try:
            user = input("> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if user.strip() in ("/exit", "/quit"):
            return 0
        if user.strip() == "/reset":
            history.clear()
            continue
        if not user.strip():
            continue
        history.append({"role": "user", "content": user})
        prompt = engine.input_processor.render_chat(system + history)
        request_id = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(request_id, prompt, params, add_special_tokens=False)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            history.pop()
            continue
        reply = []
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    piece = output.outputs[0].text if output.outputs else ""
                    reply.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            engine.abort_request(request_id)
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})
