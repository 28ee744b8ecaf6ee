"""Every command README.md shows must run as written on a fresh machine. Each shell command is
checked: `tokenmill ...` against the CLI's own parser, `pip install` extras against
pyproject.toml; the cheap ones then run for real (generate, chat, the dummy shape, the Python
examples). The install itself is what `.ci/run` runs (see test_ci_runs_the_readme_commands)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
TOKENMILL = [sys.executable, "-m", "tokenmill.entrypoints.cli.main"]  # the `tokenmill` script's module


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def shell_commands() -> list[str]:
    """Each `&&`-joined part of each line of the README's bash blocks, without its comment."""
    out = []
    for block in blocks("bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            out += [part.strip() for part in line.split("&&") if part.strip()]
    return out


COMMANDS = shell_commands()


def test_the_readme_shows_the_commands_this_test_checks():
    assert any(c.startswith("pip install torch") for c in COMMANDS)
    assert "tokenmill chat" in COMMANDS and any(c.startswith("tokenmill serve") for c in COMMANDS)
    assert "python3 -m pytest -q -p no:cacheprovider" in COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_is_valid_as_written(command):
    argv = shlex.split(command)
    if argv[0] == "tokenmill":
        from tokenmill.entrypoints.cli.main import build_parser, expand_config_file
        parser = build_parser()
        args = parser.parse_args(expand_config_file(parser, argv[1:]))  # SystemExit on a bad flag
        assert getattr(args, "func", None) is not None, command
    elif argv[:2] == ["pip", "install"]:
        extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
        for arg in argv[2:]:
            match = re.fullmatch(r"\.\[([a-z,]+)\]", arg)
            if match:
                assert set(match.group(1).split(",")) <= set(extras), f"{command}: unknown extra"
        if "torch==2.13.0" in argv:
            assert "--extra-index-url" in argv or "--index-url" in argv, "the CPU build needs its index"
        assert not any(a.startswith("tokenmill[") for a in argv), "tokenmill is not on a registry"
    elif argv[0] == "apt-get":
        assert argv[1] in ("update", "install")
    else:
        assert command == "python3 -m pytest -q -p no:cacheprovider", f"unchecked README command: {command}"


def test_ci_runs_the_readme_commands():
    """.ci/run runs the README's install and test commands, character for character."""
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    for block in blocks("bash")[:1] + [b for b in blocks("bash") if "pytest" in b]:
        for line in block.strip().splitlines():
            assert line in ci, f".ci/run does not run the README's {line!r}"


def run_tokenmill(command: str, **kwargs) -> subprocess.CompletedProcess:
    argv = shlex.split(command)
    assert argv[0] == "tokenmill"
    return subprocess.run(TOKENMILL + argv[1:], capture_output=True, text=True, timeout=600, **kwargs)


@pytest.mark.slow
def test_generate_runs_as_written():
    command = next(c for c in COMMANDS if c.startswith("tokenmill generate \"The capital"))
    proc = run_tokenmill(command)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Paris" in proc.stdout
    # The start says what it does: threads, the KV pool and why, and when it is ready.
    assert re.search(r"tokenmill: \d+ CPU threads? \(", proc.stderr)
    assert "tokenmill: KV cache " in proc.stderr and "tokenmill: ready in" in proc.stderr


@pytest.mark.slow
def test_chat_runs_as_written():
    proc = run_tokenmill("tokenmill chat", input="What is 2 + 2?\n/exit\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip(), "no reply"


@pytest.mark.slow
def test_dummy_shape_runs_on_cpu_with_default_settings():
    command = next(c for c in COMMANDS if "--load-format dummy" in c)
    proc = run_tokenmill(command)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "<|dummy_" in proc.stdout or proc.stdout.strip()  # random tokens, but visible ones


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_examples_run_as_written(index, tmp_path):
    code = blocks("python")[index]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip()
