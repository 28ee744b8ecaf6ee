"""Hostile clients against the real server stack over the fake model (`server_fakes.py`): every
bad request a 4xx, no ghost requests, slow clients cut off, deadlines kept, admission by time
(docs/reliability.md). Each fake step takes 50 ms, so a 60-token request runs ~3 s."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time

import httpx
import pytest

from server_harness import start_fake_server

KEY = "sk-test-key"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = "/v1/messages"
USER = [{"role": "user", "content": "hi"}]
AUTH = f"authorization: Bearer {KEY}\r\n".encode()

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    srv = start_fake_server(KEY, env={"FAKE_STEP_DELAY_S": "0.05", "FAKE_HEADER_TIMEOUT_S": "1",
                                      "FAKE_BODY_TIMEOUT_S": "1"})
    yield srv
    srv.stop()


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as c:
        yield c


def raw_post(path: str, body: bytes) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n").encode()
    return head + AUTH + b"\r\n" + body


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a content-length body (status, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response")
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = int(lengths[0])
    while len(rest) < length:
        rest += sock.recv(65536)
    return int(head.split()[1]), rest


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    return resp.json()["error"]


# ----- malformed input: 400, never 500 -----
def test_405_carries_allow(client):
    resp = client.get(CHAT)
    assert_openai_error(resp, 405)
    assert resp.headers["allow"] == "POST"


@pytest.mark.parametrize("path,template", [
    (COMPLETIONS, '{"prompt": %s}'),
    (CHAT, '{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"a": %s}}'),
    (MESSAGES, '{"model": "fake-model", "max_tokens": 2, "messages": %s}'),
])
def test_deeply_nested_json_is_400(client, path, template):
    for depth in (300, 20_000):  # past the parser's depth limit; past the parse-work cap
        raw = template % ("[" * depth + "]" * depth)
        resp = client.post(path, content=raw, headers={"content-type": "application/json"})
        assert resp.status_code == 400, resp.text


@pytest.mark.parametrize("path,raw", [
    (CHAT, '{"messages": [{"role": "user", "content": "a\\ud800"}]}'),
    (COMPLETIONS, '{"prompt": "\\udfff"}'),
    (MESSAGES, '{"model": "fake-model", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/v1/messages/count_tokens",
     '{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("/tokenize", '{"prompt": "\\ud800"}'),
])
def test_lone_surrogates_are_400(client, path, raw):
    resp = client.post(path, content=raw, headers={"content-type": "application/json"})
    assert resp.status_code == 400, resp.text


@pytest.mark.parametrize("body", [
    {"prompt": "a", "priority": 10**20}, {"prompt": "a", "priority": -10**20},
    {"prompt": "a", "top_k": 10**20}, {"prompt": "a", "stop_token_ids": [10**20]},
    {"prompt": "a", "seed": 2**64}, {"prompt": "a", "logit_bias": {"²": 1}},
    {"prompt": "a", "structured_outputs": {"regex": 5}}, {"prompt": "a", "structured_outputs": {"grammar": 7}},
    {"prompt": "a", "max_tokens": "10"}, {"prompt": "a", "max_tokens": True}, {"prompt": [True]},
    {"prompt": "a", "stream": "yes"}, {"prompt": "a", "stream": 0}, {"prompt": "a", "temperature": 2.5},
    {"prompt": "a", "logprobs": "2"},
])
def test_out_of_range_and_mistyped_fields_are_400(client, body):
    assert_openai_error(client.post(COMPLETIONS, json=body), 400)


@pytest.mark.parametrize("fields", [
    {"chat_template": "{{ 7 * 7 }}"},
    {"chat_template_kwargs": {"chat_template": "{{ raise_exception('R:' ~ (7*7)) }}"}},
    {"chat_template_kwargs": {"tokenize": True}},
    {"logprobs": "yes"},
    {"n": 128, "max_tokens": 2, "structured_outputs": {"choice": "abc"}},
    {"structured_outputs": {"json_object": "yes"}},
])
def test_chat_fields_refused(client, fields):
    err = assert_openai_error(client.post(CHAT, json={"messages": USER, **fields}), 400)
    assert "49" not in err["message"]


def test_valid_edge_values_are_accepted(client):
    resp = client.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 2, "n": 2, "seed": 2**63 - 1})
    assert resp.status_code == 200, resp.text
    assert [c["text"] for c in resp.json()["choices"]] == ["ab", "ab"]


def test_an_unexpected_error_does_not_reset_the_keep_alive_connection(server):
    # Prompt token 6 makes the fake input processor raise: a 500, after which the same connection
    # must still serve the next request.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw_post(COMPLETIONS, json.dumps({"prompt": [6, 1], "max_tokens": 2}).encode()))
        status, body = read_response(sock)
        assert status == 500 and json.loads(body)["error"]["message"] == "internal server error"
        sock.sendall(raw_post(COMPLETIONS, json.dumps({"prompt": "a", "max_tokens": 2}).encode()))
        status, body = read_response(sock)
        assert status == 200 and json.loads(body)["choices"][0]["text"] == "ab"


# ----- slow clients -----
def test_slow_headers_get_408_and_are_disconnected(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        start = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        received = b""
        for _ in range(40):  # a header line every 0.1 s, never finishing (header timeout: 1 s)
            try:
                sock.sendall(b"x-slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.1)
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except OSError:
            pass
        assert received.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - start < 3.5


def test_an_idle_connection_that_never_sends_is_closed(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        start = time.monotonic()
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")
        assert time.monotonic() - start < 3.5


def test_slow_body_gets_408(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        body = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
        sock.sendall(raw_post(COMPLETIONS, body)[:-5])  # all but the last five bytes of the body
        start = time.monotonic()
        status, payload = read_response(sock)
        assert status == 408 and json.loads(payload)["error"]["type"] == "timeout_error"
        assert time.monotonic() - start < 3.5


def test_slow_body_does_not_hold_up_the_drain():
    srv = start_fake_server(env={"FAKE_STEP_DELAY_S": "0.05", "FAKE_DRAIN_TIMEOUT_S": "30",
                                 "FAKE_BODY_TIMEOUT_S": "60"})
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            sock.sendall(raw_post(COMPLETIONS, b'{"prompt": "a", "max_tokens": 2}')[:-3])

            async def run() -> None:
                async with httpx.AsyncClient(base_url=srv.url, timeout=30) as ac:
                    inflight = asyncio.create_task(ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 20}))
                    await asyncio.sleep(0.3)
                    srv.proc.send_signal(signal.SIGTERM)
                    done = await inflight
                    assert done.status_code == 200 and len(done.json()["choices"][0]["text"]) == 20

            start = time.monotonic()
            asyncio.run(run())
            # The drain waits for the request in flight, not for the body still trickling in.
            assert srv.proc.wait(20) == 0
            assert time.monotonic() - start < 15
    finally:
        srv.stop()


# ----- deadlines -----
def test_a_request_past_its_timeout_is_aborted_with_408(server, client):
    start = time.monotonic()
    resp = client.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 60, "timeout": 0.4})
    err = assert_openai_error(resp, 408)
    assert err["type"] == "timeout_error" and err["code"] == "request_timeout" and "0.4" in err["message"]
    assert time.monotonic() - start < 2.0
    assert server.wait_idle(timeout_s=2.0) < 2.0  # aborted in the core, not left running


def test_a_stream_past_its_timeout_ends_with_an_error_event(server, client):
    with client.stream("POST", CHAT, json={"messages": USER, "max_tokens": 40, "stream": True,
                                           "timeout": 0.5}) as resp:
        assert resp.status_code == 200
        events = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    last = json.loads(events[-1])
    assert last["error"]["code"] == "request_timeout"
    assert server.wait_idle(timeout_s=2.0) < 2.0


def test_anthropic_timeout_is_408_in_its_format(client):
    body = {"model": "fake-model", "max_tokens": 40, "messages": USER, "timeout": 0.3}
    resp = client.post(MESSAGES, json=body)
    assert resp.status_code == 408 and resp.json()["error"]["type"] == "timeout_error"


# ----- ghost requests -----
def test_a_request_the_core_refuses_is_answered_and_frees_its_capacity(server, client):
    # Prompt token 9 is refused by the fake core's add_request. Each such request (n=4) would hold
    # half the admission capacity (4 running + 4 queued) for good if the core never answered it.
    for _ in range(3):
        resp = client.post(COMPLETIONS, json={"prompt": [9, 1], "n": 4, "max_tokens": 2}, timeout=10)
        assert resp.status_code == 500, resp.text
    ok = client.post(COMPLETIONS, json={"prompt": "a", "n": 4, "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    server.wait_idle()


# ----- admission by time -----
def test_admission_by_time_refuses_at_once_with_retry_after():
    # 4 running + 100 queued by count; the time bound is 1 s at the fake's ~20-80 tokens/s.
    srv = start_fake_server(env={"FAKE_STEP_DELAY_S": "0.05", "FAKE_MAX_QUEUE_LEN": "100",
                                 "FAKE_MAX_QUEUE_WAIT_S": "1"})
    try:
        async def run() -> None:
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as ac:
                warm = await ac.post(COMPLETIONS, json={"prompt": "a", "max_tokens": 5})
                assert warm.status_code == 200  # the engine's speed is now measured

                async def one(path: str, body: dict) -> tuple[httpx.Response, float]:
                    start = time.monotonic()
                    resp = await ac.post(path, json=body)
                    return resp, time.monotonic() - start

                results = await asyncio.gather(*[one(COMPLETIONS, {"prompt": "a", "max_tokens": 40})
                                                  for _ in range(12)])
                refused = [(r, t) for r, t in results if r.status_code == 429]
                admitted = [r for r, _ in results if r.status_code == 200]
                assert refused and admitted and len(refused) + len(admitted) == 12
                for resp, elapsed in refused:
                    assert resp.json()["error"]["type"] == "rate_limit_error"
                    assert int(resp.headers["retry-after"]) >= 1
                    assert elapsed < 1.0  # refused at once, not after waiting
                assert all(len(r.json()["choices"][0]["text"]) == 40 for r in admitted)
                body = {"model": "fake-model", "max_tokens": 40, "messages": USER}
                answers = [await ac.post(MESSAGES, json=body) for _ in range(2)]
                assert {r.status_code for r in answers} <= {200, 529}

        asyncio.run(run())
        srv.wait_idle()
    finally:
        srv.stop()


# ----- the OpenAPI document -----
def test_openapi_is_served_behind_the_key_and_describes_the_request_models(server):
    assert httpx.get(f"{server.url}/openapi.json").status_code == 401
    assert httpx.get(f"{server.url}/docs").status_code == 401
    doc = httpx.get(f"{server.url}/openapi.json", headers=server.headers()).json()
    chat = doc["paths"][CHAT]["post"]
    ref = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    model = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert model["properties"]["max_tokens"]["anyOf"][0]["type"] == "integer"
    assert model["properties"]["temperature"]["anyOf"][0]["maximum"] == 2
    assert {"400", "401", "408", "413", "429", "503"} <= set(chat["responses"])
    assert "529" in doc["paths"][MESSAGES]["post"]["responses"]
    assert doc["security"] and doc["paths"]["/health"]["get"]["security"] == []
    docs = httpx.get(f"{server.url}/docs", headers=server.headers())
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
