"""`tokenmill chat` in a real terminal: tmux runs it, `send-keys` / `paste-buffer` type into it
and `capture-pane` reads the screen. A 5,000-character paste (past a terminal's 4,095-character
line buffer) arrives whole, Home/End (Ctrl-A / Ctrl-E) move within it, and /exit ends the chat.
Skipped without tmux, except under CI, where `.ci/run` installs it."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

pytestmark = pytest.mark.slow


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def wait_for(session: str, text: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        # The chat draws a long line as rows of its own, each wrapped row indented by the prompt's
        # width ("> "): join them back.
        screen = tmux("capture-pane", "-p", "-S", "-", "-t", session).replace("\n  ", "")
        if text in screen:
            return screen
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not on the screen after {timeout_s}s:\n{screen[-3000:]}")


def test_long_paste_line_editing_and_exit_in_a_terminal(tmp_path):
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("needs tmux (apt-get install -y tmux)")
        pytest.skip("needs tmux")
    session = f"tokenmill-chat-{uuid.uuid4().hex[:8]}"
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "tokenmill.entrypoints.cli.main", "chat",
                                                "--max-tokens", "4"])
    env = f"PYTHONPATH={shlex.quote(os.environ.get('PYTHONPATH', ROOT))}"
    tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "60", f"cd {ROOT} && {env} {command}; echo CHAT-EXITED; sleep 60")
    try:
        wait_for(session, "tokenmill chat -", 300)
        paste = tmp_path / "paste.txt"
        paste.write_text("z" * 5000)
        tmux("load-buffer", str(paste))
        tmux("paste-buffer", "-p", "-t", session)  # -p: bracketed paste, as a terminal sends it
        tmux("send-keys", "-t", session, "C-a", "X", "C-e", "Y")
        wait_for(session, "X" + "z" * 5000 + "Y", 20)
        tmux("send-keys", "-t", session, "C-a", "C-k", "/exit", "Enter")
        wait_for(session, "CHAT-EXITED", 60)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
