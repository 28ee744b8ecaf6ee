"""`tokenmill serve` start-up failures: one clear line and a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess

from conftest import serve_argv
from server_harness import free_port


def test_unknown_model_exits_with_a_clear_message():
    argv = serve_argv(free_port()) + ["--model", "/nonexistent/model.gguf"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "cannot serve" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
