"""docs/reliability.md item 24: a KV pool far smaller than the load. Requests are preempted and
recomputed, never dropped: every one completes with all its tokens, and the pool drains to empty."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from conftest import serve_argv
from server_harness import running_server

# SmolLM2-135M in bf16: 30 layers x (K+V) x 3 KV heads x 64 x 2 bytes = 23,040 bytes per token,
# so 25 MB holds about a thousand tokens, for a load of 16 x (~40 + 60) = 1,600.
KV_BYTES = 25_000_000


@pytest.fixture(scope="module")
def small_kv_server():
    with running_server(lambda port: serve_argv(port) + ["--kv-cache-memory", str(KV_BYTES), "--max-num-seqs", "16"],
                        api_key="sk-e2e-key") as srv:
        yield srv


def test_preemption_not_failure_when_the_pool_runs_dry(small_kv_server):
    srv = small_kv_server

    async def one(ac: httpx.AsyncClient, i: int) -> dict:
        resp = await ac.post("/v1/completions", json={
            "prompt": f"Story number {i}: once upon a time, in a land far away, there lived a dragon who",
            "max_tokens": 60, "ignore_eos": True, "temperature": 0})
        assert resp.status_code == 200, resp.text
        return resp.json()

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=srv.url, headers=srv.headers(), timeout=300) as ac:
            return await asyncio.gather(*[one(ac, i) for i in range(16)])

    results = asyncio.run(run())
    assert all(r["usage"]["completion_tokens"] == 60 for r in results)
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
    assert srv.metric("num_preemptions_total") > 0
    srv.wait_idle()
    assert srv.metric("kv_cache_usage_perc") == 0.0
