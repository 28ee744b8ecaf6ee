"""`tokenmill chat` reads a terminal's keys with prompt_toolkit: long pastes arrive whole, arrow
keys edit, Alt-Enter adds a line, Ctrl-D ends. Driven through prompt_toolkit's pipe input, which
feeds the same key parser a terminal does."""

from __future__ import annotations

import pytest
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput

from tokenmill.entrypoints.cli.chat import make_line_reader


def read_with_keys(keys: str) -> str:
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        return make_line_reader(True, input=pipe, output=DummyOutput())()


def test_a_paste_longer_than_the_terminal_line_buffer_is_not_cut():
    text = "x" * 5000 + "y" * 5000  # a terminal's canonical mode stops at 4,095 characters
    # Bracketed paste, as terminals send a paste: newlines inside it do not send the message.
    pasted = read_with_keys("\x1b[200~" + text + "\nsecond line\x1b[201~\r")
    assert pasted == text + "\nsecond line"


def test_arrow_keys_move_the_cursor_instead_of_printing_escape_codes():
    left, home = "\x1b[D", "\x1b[H"
    assert read_with_keys("helo" + left + "l\r") == "hello"
    assert read_with_keys("world" + home + "hello \r") == "hello world"


def test_alt_enter_adds_a_line_and_enter_sends():
    assert read_with_keys("first\x1b\rsecond\r") == "first\nsecond"


def test_ctrl_d_on_an_empty_line_ends_the_chat():
    with pytest.raises(EOFError):
        read_with_keys("\x04")


def test_up_arrow_recalls_the_previous_message():
    with create_pipe_input() as pipe:
        read = make_line_reader(True, input=pipe, output=DummyOutput())
        pipe.send_text("first message\r")
        assert read() == "first message"
        pipe.send_text("\x1b[A\r")
        assert read() == "first message"
