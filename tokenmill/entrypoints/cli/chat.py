"""`tokenmill chat`: an interactive chat in the terminal, replies streamed token by token.

On a terminal the line is read by prompt_toolkit, not `input()`: the terminal's own line buffer
(canonical mode) cuts a pasted line at 4,095 characters and prints arrow keys as escape codes,
while prompt_toolkit reads raw keys, so pastes of any length arrive whole, arrows and Home/End
edit, Up/Down recall earlier messages, and a pasted block with newlines stays one message. Enter
sends; Alt-Enter (or Esc then Enter) starts a new line. Piped input is read one line per message.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from tokenmill.config.sampling_args import add_sampling_args, sampling_params_from_args
from tokenmill.entrypoints.cli.startup import add_thread_arg, start_engine

HELP = ("Enter sends, Alt-Enter adds a line, Ctrl-C stops a reply; /reset clears the conversation, "
        "/exit (or Ctrl-D) quits.")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    parser = subparsers.add_parser("chat", help="chat with the model in the terminal")
    parser.add_argument("--system", default=None, help="system prompt")
    add_thread_arg(parser)
    add_sampling_args(parser, default_max_tokens=512)
    EngineArgs.add_cli_args(parser)
    parser.set_defaults(func=run)
    return parser


def make_line_reader(interactive: bool, input=None, output=None) -> Callable[[], str]:
    """A function returning the next message; raises EOFError at the end (Ctrl-D) and
    KeyboardInterrupt on Ctrl-C. `input`/`output`: prompt_toolkit's, for tests."""
    if not interactive:
        def read_piped() -> str:
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")
        return read_piped

    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    bindings = KeyBindings()

    @bindings.add("enter")
    def _send(event) -> None:
        event.current_buffer.validate_and_handle()

    @bindings.add("escape", "enter")  # Alt-Enter sends Esc + Enter
    def _newline(event) -> None:
        event.current_buffer.insert_text("\n")

    session = PromptSession(history=InMemoryHistory(), key_bindings=bindings, multiline=True,
                            # "." marks a line the user added; a line wrapped at the edge is indented.
                            prompt_continuation=lambda width, line, wrap: " " * width if wrap
                            else "." * (width - 1) + " ",
                            input=input, output=output)
    return lambda: session.prompt("> ")


def run(args: argparse.Namespace) -> int:
    from tokenmill.sampling_params import RequestOutputKind

    engine = start_engine(args)
    params = sampling_params_from_args(args, output_kind=RequestOutputKind.DELTA)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    read_line = make_line_reader(interactive)
    if interactive:
        print(f"tokenmill chat - {engine.config.model.served_model_name}. {HELP}")
    turn = 0
    while True:
        try:
            user = read_line()
        except EOFError:
            break
        except KeyboardInterrupt:
            if interactive:
                continue  # Ctrl-C clears the line, as in a shell; Ctrl-D or /exit quits
            break
        if user.strip() in ("/exit", "/quit"):
            break
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
    if interactive:
        print()
    exit_now(engine)
    return 0


def exit_now(engine) -> None:
    """Leaves at once. Nothing is left to save (the conversation is not kept), and an orderly
    interpreter exit spends seconds tearing down torch's thread pools and the model's tensors."""
    engine.core.shutdown()  # tensor-parallel worker processes, if any, must not be orphaned
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
