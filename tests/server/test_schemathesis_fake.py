"""schemathesis, every phase, against the real server stack over the fake model: every operation
in the server's own /openapi.json, thousands of generated requests, valid and not. Zero 5xx, zero
responses off their documented schema, and the server still answers afterwards."""

from __future__ import annotations

import httpx
import pytest

from server_harness import run_schemathesis, start_fake_server

pytestmark = pytest.mark.slow


def test_schemathesis_finds_nothing(tmp_path):
    # The fake's fault tokens (crash, wedge, refuse) would be fuzzed into prompts: off here.
    srv = start_fake_server("sk-fuzz", env={"FAKE_FAULT_TOKENS": "0"})
    try:
        result = run_schemathesis(srv, str(tmp_path), phases="examples,coverage,fuzzing", max_examples=10)
        assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
        assert "generated" in result.stdout and " passed" in result.stdout
        with httpx.Client(base_url=srv.url, headers=srv.headers(), timeout=30) as c:
            assert c.get("/health").status_code == 200
            ok = c.post("/v1/completions", json={"prompt": "a", "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "abc"
        srv.wait_idle()
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
