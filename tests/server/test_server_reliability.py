"""docs/reliability.md cases against the real server stack (uvicorn, app, AsyncEngine, engine-core
process over ZMQ) with a fake model (`server_fakes.py`): fast, and able to crash or wedge the core
on purpose. Each fake step takes 50 ms, so a 60-token request runs ~3 s."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time

import httpx
import pytest

from server_harness import start_fake_server

KEY = "sk-test-key"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = "/v1/messages"
USER = [{"role": "user", "content": "hi"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = start_fake_server(KEY, env={"FAKE_STEP_DELAY_S": "0.05"})
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as c:
        yield c


def openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def anthropic_error(resp: httpx.Response, status: int, type_: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["type"] == "error" and body["error"]["type"] == type_
    assert resp.headers.get("request-id")
    return body["error"]


# ----- 1-3: bodies -----
@pytest.mark.parametrize("content", [b"not json", b"[1, 2]", b'"a string"', b"{", b"\xff\xfe"])
def test_body_not_a_json_object_is_400(client, content):
    resp = client.post(CHAT, content=content, headers={"content-type": "application/json"})
    assert openai_error(resp, 400)["type"] == "invalid_request_error"
    resp = client.post(MESSAGES, content=content, headers={"content-type": "application/json"})
    anthropic_error(resp, 400, "invalid_request_error")


def test_wrong_content_type_is_415(client):
    resp = client.post(CHAT, content=json.dumps({"messages": USER}), headers={"content-type": "text/plain"})
    openai_error(resp, 415)


def test_body_over_limit_is_413(client):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 100_000}]})
    openai_error(client.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)
    anthropic_error(client.post(MESSAGES, content=big, headers={"content-type": "application/json"}),
                    413, "request_too_large")


def test_body_over_limit_without_content_length_is_413(client):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'
    resp = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    openai_error(resp, 413)


def test_thousands_of_malformed_items_give_a_bounded_400(client):
    resp = client.post(CHAT, json={"messages": [{"role": "x", "content": "yyyy"}] * 1800})
    err = openai_error(resp, 400)
    assert len(err["message"]) < 1200 and "yyyy" not in err["message"]


# ----- 4-13: fields -----
@pytest.mark.parametrize("messages", [None, "hello", [], [{"content": "x"}], [{"role": "user"}],
                                      [{"role": "alien", "content": "x"}]])
def test_bad_messages_are_400(client, messages):
    openai_error(client.post(CHAT, json={"messages": messages}), 400)


def test_unknown_model_is_404(client):
    err = openai_error(client.post(CHAT, json={"model": "nope", "messages": USER}), 404)
    assert err["type"] == "not_found_error"
    anthropic_error(client.post(MESSAGES, json={"model": "nope", "max_tokens": 5, "messages": USER}),
                    404, "not_found_error")


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": USER, "max_tokens": 0}),
    (CHAT, {"messages": USER, "max_tokens": -3}),
    (CHAT, {"messages": USER, "n": 0}),
    (CHAT, {"messages": USER, "n": 100000}),
    (COMPLETIONS, {"prompt": ["a"] * 10_000}),
    (COMPLETIONS, {"prompt": ""}),
    (COMPLETIONS, {"prompt": []}),
    (COMPLETIONS, {"prompt": [5, -1]}),
    (COMPLETIONS, {"prompt": [5, 10**9]}),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}),
    (COMPLETIONS, {"prompt": "a", "logprobs": -1}),
    (CHAT, {"messages": USER, "seed": 2**63}),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": True}}),
    (CHAT, {"messages": USER, "top_p": 1.5}),
    (CHAT, {"messages": USER, "top_k": -7}),
    (CHAT, {"messages": USER, "min_p": -0.1}),
    (CHAT, {"messages": USER, "presence_penalty": 9}),
    (CHAT, {"messages": USER, "repetition_penalty": 0}),
    (CHAT, {"messages": USER, "min_tokens": 5, "max_tokens": 2}),
    (CHAT, {"messages": USER, "chat_template": "{{ 7 * 7 }}"}),
])
def test_bad_fields_are_400(client, path, body):
    openai_error(client.post(path, json=body), 400)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_numbers_are_400(client, literal):
    raw = '{"messages": [{"role": "user", "content": "hi"}], "temperature": %s}' % literal
    openai_error(client.post(CHAT, content=raw, headers={"content-type": "application/json"}), 400)


def test_logit_bias_errors_name_the_keys(client):
    err = openai_error(client.post(CHAT, json={"messages": USER, "logit_bias": {"5000": 1, "7": 2}}), 400)
    assert "5000" in err["message"]
    err = openai_error(client.post(CHAT, json={"messages": USER, "logit_bias": {"seven": 1}}), 400)
    assert "seven" in err["message"]
    openai_error(client.post(CHAT, json={"messages": USER, "logit_bias": {"7": "big"}}), 400)


def test_context_length_boundary(client):
    # The fake tokenizes one token per character; max_model_len is 64.
    ok = client.post(COMPLETIONS, json={"prompt": "a" * 10, "max_tokens": 54})
    assert ok.status_code == 200, ok.text
    err = openai_error(client.post(COMPLETIONS, json={"prompt": "a" * 10, "max_tokens": 55}), 400)
    assert err["code"] == "context_length_exceeded"
    assert "64" in err["message"] and "65" in err["message"]


def test_context_length_error_comes_before_any_sse_byte(client):
    resp = client.post(COMPLETIONS, json={"prompt": "a" * 10, "max_tokens": 55, "stream": True})
    assert resp.headers["content-type"].startswith("application/json")
    assert openai_error(resp, 400)["code"] == "context_length_exceeded"


@pytest.mark.parametrize("body", [
    {"model": "fake-model", "messages": USER},
    {"model": "fake-model", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    {"model": "fake-model", "max_tokens": 5, "messages": [{"role": "user", "content": [{"text": "a"}]}]},
    {"model": "fake-model", "max_tokens": 0, "messages": USER},
])
def test_anthropic_bad_requests_are_400(client, body):
    anthropic_error(client.post(MESSAGES, json=body), 400, "invalid_request_error")


def test_unknown_route_is_404_in_openai_format(client):
    openai_error(client.get("/v1/nothing"), 404)


# ----- 25: auth -----
def test_api_key_guards_every_route_but_health(server):
    url = server.url
    assert httpx.get(f"{url}/health").status_code == 200
    openai_error(httpx.get(f"{url}/v1/models"), 401)
    openai_error(httpx.get(f"{url}/metrics"), 401)
    openai_error(httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    anthropic_error(httpx.post(f"{url}{MESSAGES}", json={}), 401, "authentication_error")
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"x-api-key": KEY}).status_code == 200


# ----- the happy paths of the fake -----
def test_streaming_chat_framing(client):
    with client.stream("POST", CHAT, json={"messages": USER, "max_tokens": 3, "stream": True,
                                           "stream_options": {"include_usage": True}}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-1]) == "abc"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_completions_n_and_several_prompts(client):
    body = client.post(COMPLETIONS, json={"prompt": ["ab", "cd"], "n": 2, "max_tokens": 2, "echo": True}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in body["choices"]] == ["abab", "abab", "cdab", "cdab"]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0}}


# ----- 17-19: disconnects, cancellation storm, queue full -----
def test_disconnect_mid_stream_aborts(server, client):
    with client.stream("POST", COMPLETIONS, json={"prompt": "a", "max_tokens": 60, "stream": True}) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break
    # The fake request would run ~3 s; aborted, the engine is idle within a few steps.
    assert server.wait_idle(timeout_s=2.0) < 2.0


def test_disconnect_mid_non_stream_aborts(server):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{COMPLETIONS}", headers=server.headers(), timeout=0.5,
                   json={"prompt": "a", "max_tokens": 60})
    assert server.wait_idle(timeout_s=2.0) < 2.0


def test_cancellation_storm_then_a_fresh_request_succeeds(server, client):
    async def storm() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=0.3) as ac:
            async def one() -> None:
                try:
                    await ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 60, "stream": True})
                except httpx.HTTPError:
                    pass
            await asyncio.gather(*[one() for _ in range(100)])
    asyncio.run(storm())
    start = time.monotonic()
    resp = client.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "ab"
    assert time.monotonic() - start < 3.0
    server.wait_idle()


def test_queue_full_is_429_and_529_and_admitted_requests_finish(server):
    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers(), timeout=30) as ac:
            # max_num_seqs 4 + max_queue_len 4: eight long requests fill the server.
            held = [asyncio.create_task(ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 40}))
                    for _ in range(8)]
            await asyncio.sleep(0.8)
            over = await ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
            assert over.status_code == 429 and over.headers["retry-after"]
            assert over.json()["error"]["type"] == "rate_limit_error"
            over = await ac.post(MESSAGES, json={"model": "fake-model", "max_tokens": 2, "messages": USER})
            assert over.status_code == 529 and over.headers["retry-after"]
            assert over.json()["error"]["type"] == "overloaded_error"
            done = await asyncio.gather(*held)
            assert [r.status_code for r in done] == [200] * 8
            assert all(len(r.json()["choices"][0]["text"]) == 40 for r in done)
    asyncio.run(run())
    server.wait_idle()


# ----- 20-22: engine death, wedge, SIGTERM (their own servers) -----
def test_engine_death_fails_requests_and_exits_nonzero():
    srv = start_fake_server()
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            slow = {"prompt": "a", "max_tokens": 60, "stream": True}
            with c.stream("POST", COMPLETIONS, json=slow) as resp:
                it = resp.iter_lines()
                assert next(l for l in it if l.startswith("data: "))
                # A prompt starting with token 7 crashes the fake core mid-step.
                crash = c.post(COMPLETIONS, json={"prompt": [7, 1], "max_tokens": 5})
                assert crash.status_code >= 500
                rest = [l for l in it if l.startswith("data: ")]
            assert "error" in json.loads(rest[-1][6:]) and not any('"finish_reason":"stop"' in l for l in rest)
            health = c.get("/health")
            assert health.status_code == 503
        assert srv.proc.wait(20) != 0
    finally:
        srv.stop()


def test_wedged_engine_fails_health():
    srv = start_fake_server(env={"FAKE_WEDGE_TIMEOUT_S": "1"})
    try:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post(COMPLETIONS, json={"prompt": [8, 1], "max_tokens": 5}, timeout=0.3)
            # The disconnect aborts nothing: the core is stuck inside step().
            deadline = time.monotonic() + 10
            while c.get("/health").status_code == 200:
                assert time.monotonic() < deadline, "/health still 200 with a wedged engine"
                time.sleep(0.2)
    finally:
        srv.stop(timeout_s=5)


def test_sigterm_drains_in_flight_and_refuses_new():
    srv = start_fake_server(env={"FAKE_STEP_DELAY_S": "0.05"})
    try:
        async def run() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
                inflight = asyncio.create_task(ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 30}))
                await asyncio.sleep(0.5)
                srv.proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                refused = await ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2})
                assert refused.status_code == 503
                assert (await ac.get("/health")).status_code == 503
                done = await inflight
                assert done.status_code == 200 and len(done.json()["choices"][0]["text"]) == 30
        asyncio.run(run())
        assert srv.proc.wait(20) == 0
        # The engine-core child was reaped with the server: its pid is gone.
        core_pid = int(re.search(r"engine core ready \(pid (\d+)\)", srv.log()).group(1))
        with pytest.raises(ProcessLookupError):
            os.kill(core_pid, 0)
    finally:
        srv.stop()
