"""Raw HTTP against a real `tokenmill serve`: framing, malformed bodies, disconnects, concurrency."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as c:
        yield c


def assert_engine_clean(server) -> None:
    """docs/reliability.md's "engine OK": nothing running or waiting, no KV block held."""
    server.wait_idle(timeout_s=5)
    assert server.metric("kv_cache_usage_perc") == 0.0


def test_health_version_metrics(server, client):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert client.get("/version").json()["version"]
    text = client.get("/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", "prompt_tokens_total", "generation_tokens_total",
                 "time_to_first_token_seconds", "time_per_output_token_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "prefix_cache_queries_total", "prefix_cache_hits_total"):
        assert f"tokenmill:{name}" in text


def test_tokenize_detokenize_round_trip(client, model_name):
    tokens = client.post("/tokenize", json={"model": model_name, "prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 512
    text = client.post("/detokenize", json={"tokens": tokens["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
    assert chat["count"] > tokens["count"]  # the template adds role markers
    assert client.post("/detokenize", json={"tokens": [-1]}).status_code == 400


@pytest.mark.parametrize("content,status", [(b"{oops", 400), (b"[]", 400), (b"null", 400)])
def test_malformed_bodies(client, content, status):
    resp = client.post(CHAT, content=content, headers={"content-type": "application/json"})
    assert resp.status_code == status and resp.json()["error"]["type"] == "invalid_request_error"


def test_huge_prompt_list_is_400_before_allocation(server, client):
    resp = client.post(COMPLETIONS, json={"prompt": ["a"] * 100_000, "max_tokens": 1})
    assert resp.status_code == 400
    assert_engine_clean(server)


def test_out_of_vocab_and_bad_logit_bias(client):
    assert client.post(COMPLETIONS, json={"prompt": [1, 10**7]}).status_code == 400
    resp = client.post(CHAT, json={"messages": USER, "logit_bias": {"99999999": 5}})
    assert resp.status_code == 400 and "99999999" in resp.json()["error"]["message"]


def test_anthropic_sse_framing_has_ping_and_names(client, model_name):
    with client.stream("POST", "/v1/messages", json={"model": model_name, "max_tokens": 4, "stream": True,
                                                     "messages": USER}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e.split("\n") for e in raw.strip().split("\n\n")]
    names = [e[0].removeprefix("event: ") for e in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    for event in events:  # each `data:` is one line of JSON whose type is the event name
        assert json.loads(event[1].removeprefix("data: "))["type"] == event[0].removeprefix("event: ")


def test_disconnect_mid_stream_frees_the_request(server, client):
    body = {"messages": USER, "max_tokens": 400, "ignore_eos": True, "stream": True}
    with client.stream("POST", CHAT, json=body) as resp:
        seen = 0
        for line in resp.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    assert_engine_clean(server)


def test_disconnect_mid_non_stream_frees_the_request(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{CHAT}", headers=server.headers(), timeout=1.5,
                   json={"messages": USER, "max_tokens": 400, "ignore_eos": True})
    assert_engine_clean(server)


def test_64_concurrent_streams_complete_independently(batch_invariant_server):
    """64 streaming clients at once, 8 distinct prompts x 8 copies (greedy): every stream completes,
    copies of one prompt return identical text (docs/reliability.md item 23) and different prompts
    different text (no cross-talk between requests). Batch-invariant mode: otherwise greedy tokens
    may change with the batch a copy landed in (bf16 GEMM kernels are picked by row count)."""
    server = batch_invariant_server
    prompts = [f"Write a short poem about the number {i}." for i in range(8)]

    async def one(ac: httpx.AsyncClient, prompt: str) -> tuple[str, str]:
        text, finish = "", None
        async with ac.stream("POST", CHAT, json={"messages": [{"role": "user", "content": prompt}],
                                                 "max_tokens": 10, "temperature": 0, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        text += chunk["choices"][0]["delta"].get("content", "")
                        finish = chunk["choices"][0]["finish_reason"] or finish
        return text, finish

    async def run() -> list[tuple[str, str]]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=300,
                                     limits=limits) as ac:
            return await asyncio.gather(*[one(ac, prompts[i % 8]) for i in range(64)])

    results = asyncio.run(run())
    assert all(finish in ("stop", "length") and text for text, finish in results)
    for p in range(8):
        copies = {results[i][0] for i in range(p, 64, 8)}
        assert len(copies) == 1, f"prompt {p}: identical greedy requests differ: {copies}"
    # Each answer is about its own number: no request received another one's tokens.
    for p in range(8):
        assert str(p) in results[p][0] or results[p][0] != results[(p + 1) % 8][0]
    assert len({results[p][0] for p in range(8)}) > 1
    assert_engine_clean(server)
