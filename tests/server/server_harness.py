"""Starting a server subprocess for tests and reading its state back (shared by the fake-engine
server tests and the e2e tests)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import httpx

from tokenmill.benchmarks.common import wait_for_health


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, argv: list[str], port: int, env: dict[str, str] | None = None,
                 api_key: str | None = None, log_path: str | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.api_key = api_key
        self.log_path = log_path or f"/tmp/tokenmill-test-server-{port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def wait_ready(self, timeout_s: float) -> None:
        if wait_for_health(self.url, self.proc, timeout_s):
            return
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log()[-3000:]}")
        raise RuntimeError(f"server not ready after {timeout_s}s; log: {self.log()[-3000:]}")

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def metric(self, name: str) -> float:
        """The value of one `tokenmill:` metric (summed over label sets)."""
        text = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=5).text
        values = [float(m.group(1)) for m in re.finditer(rf"^tokenmill:{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        assert values, f"metric {name} not found"
        return sum(values)

    def wait_idle(self, timeout_s: float = 5.0) -> float:
        """Seconds until the engine reports no running and no waiting request (fails after timeout)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.metric("num_requests_running") == 0 and self.metric("num_requests_waiting") == 0:
                return time.monotonic() - start
            time.sleep(0.1)
        raise AssertionError(f"engine still busy after {timeout_s}s")

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextmanager
def running_server(make_argv: Callable[[int], list[str]], api_key: str | None = None,
                   ready_timeout_s: float = 300) -> Iterator[ServerProcess]:
    """A server subprocess on a free port (`make_argv(port)` builds its command), ready on entry and
    stopped on exit."""
    port = free_port()
    server = ServerProcess(make_argv(port), port, api_key=api_key)
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()


FAKE_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_server.py")


def start_fake_server(api_key: str | None = None, env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, FAKE_SERVER, str(port)] + ([api_key] if api_key else [])
    server = ServerProcess(argv, port, env=env, api_key=api_key)
    server.wait_ready(60)
    return server


def start_scripted_server(api_key: str, script: list[list[str]], max_model_len: int) -> ServerProcess:
    """A fake-model server that answers each prompt containing `script[i][0]` with the text
    `script[i][1]`, behind the hermes tool parser and the qwen3 reasoning parser."""
    return start_fake_server(api_key, env={
        "FAKE_SCRIPT": json.dumps(script), "FAKE_MAX_MODEL_LEN": str(max_model_len), "FAKE_FAULT_TOKENS": "0",
        "FAKE_STEP_DELAY_S": "0.001",
        "FAKE_SERVER_CONFIG": json.dumps({"tool_call_parser": "hermes", "reasoning_parser": "qwen3"})})


# Statuses that reject a request the schema does not allow: 413 (a body over the byte limit) and
# 408 (the request's own `timeout`, fuzzed down to microseconds) on top of schemathesis' defaults;
# 5xx is left to its `not_a_server_error` check, which fails the run.
SCHEMATHESIS_CONFIG = """
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "404", "405", "408", "413", "415", "429", "529"]
[checks.positive_data_acceptance]
enabled = false
"""


def run_schemathesis(server: ServerProcess, workdir: str, *, phases: str, max_examples: int, seed: int = 1,
                     timeout_s: float = 600) -> subprocess.CompletedProcess:
    """schemathesis (every check but positive-data acceptance, which the server's cross-field rules
    such as the context length make meaningless) against the server's own /openapi.json."""
    config = os.path.join(workdir, "schemathesis.toml")
    with open(config, "w") as f:
        f.write(SCHEMATHESIS_CONFIG)
    argv = [sys.executable, "-c", "from schemathesis.cli import schemathesis; schemathesis()",
            "--config-file", config, "--no-color", "run", f"{server.url}/openapi.json",
            "--phases", phases, "--max-examples", str(max_examples), "--workers", "1", "--seed", str(seed),
            "--generation-database", "none", "--report", "junit", "--report-dir", workdir]
    if server.api_key:
        argv += ["--header", f"Authorization: Bearer {server.api_key}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=workdir)
