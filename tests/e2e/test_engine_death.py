"""Kills a server's engine-core process mid-stream (a server of its own: the session's stays up).

docs/reliability.md item 20: `/health` 503, the in-flight stream ends with an error chunk (never a fake
`finish_reason: stop`), and the server exits non-zero so a supervisor restarts it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import httpx


def test_engine_death_is_reported_and_the_server_exits_nonzero(own_server):
    server = own_server
    core_pid = int(re.search(r"engine core ready \(pid (\d+)\)", server.log()).group(1))
    body = {"messages": [{"role": "user", "content": "Count to a thousand."}], "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as resp:
            lines = resp.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            os.kill(core_pid, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        last = json.loads(rest[-1].removeprefix("data: "))
        assert last["error"]["type"] == "server_error"
        assert not any('"finish_reason":"stop"' in line for line in rest)
        deadline = time.monotonic() + 5
        status = None
        while time.monotonic() < deadline and server.proc.poll() is None:
            try:
                status = httpx.get(f"{server.url}/health", timeout=1).status_code
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        assert status in (None, 503)  # None: it already exited
    assert server.proc.wait(30) != 0
