"""`tokenmill serve --ray --num-replicas 2` on a local Ray cluster: two CPU replicas of the embedded
SmolLM2-135M behind Ray's HTTP proxy (docs/scale-out.md).

Each response carries `x-tokenmill-replica` (Ray's replica id, set by the replica that answered),
which is how these tests see where requests went. One Ray server for the module: starting the
cluster and two engines costs most of a minute on a 2-core CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray.serve")

import anthropic  # noqa: E402
import httpx  # noqa: E402
import openai  # noqa: E402
from conftest import API_KEY, serve_argv  # noqa: E402
from server_harness import running_server  # noqa: E402

from tokenmill.entrypoints.ray_serve import REPLICA_HEADER  # noqa: E402

REPLICA_TITLE = "ray::ServeReplica:tokenmill:TokenmillDeployment"  # Ray's process title of a replica
NO_EOS = {"ignore_eos": True}  # vLLM's extra: every request runs to max_tokens
LONG_CHAT = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 120,
             "ignore_eos": True}


def ray_argv(port: int) -> list[str]:
    # Small engines: one math thread each (two replicas on two cores), a small KV pool.
    return serve_argv(port) + ["--ray", "--num-replicas", "2", "--engine-threads", "1",
                               "--kv-cache-memory", str(16 * 2**20), "--drain-timeout", "5"]


@pytest.fixture(scope="module")
def ray_server():
    # Ray folds similar log lines of different processes into one ("[repeated 2x across cluster]"),
    # which can hide a replica's start-up line that replica_pid() reads: keep every line.
    saved = os.environ.get("RAY_DEDUP_LOGS")
    os.environ["RAY_DEDUP_LOGS"] = "0"
    try:
        with running_server(ray_argv, api_key=API_KEY, ready_timeout_s=300) as srv:
            yield srv
    finally:
        if saved is None:
            os.environ.pop("RAY_DEDUP_LOGS", None)
        else:
            os.environ["RAY_DEDUP_LOGS"] = saved


@pytest.fixture()
def oa(ray_server):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{ray_server.url}/v1", max_retries=0, timeout=120)


def replica_pid(server, replica_id: str, timeout_s: float = 30.0) -> int:
    """The pid of a replica, from its start-up line as Ray forwards it to the driver's log (Ray's
    log monitor forwards it asynchronously, so wait for it a while)."""
    deadline = time.monotonic() + timeout_s
    while True:
        for m in re.finditer(r"pid=(\d+)\).*serving on Ray Serve replica (\w+)", server.log()):
            if m.group(2) == replica_id:
                return int(m.group(1))
        if time.monotonic() > deadline:
            raise AssertionError(f"replica {replica_id} not in the log")
        time.sleep(0.5)


def core_pid(log: str, replica_pid: int) -> int:
    """The pid of a replica's engine core, from the replica's start-up line."""
    return int(re.findall(rf"pid={replica_pid}\).*engine core ready \(pid (\d+)\)", log)[-1])


def replica_pids() -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return {int(line.split(None, 1)[0]) for line in out.splitlines()
            if line.split(None, 1)[1:] == [REPLICA_TITLE]}


def children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "--ppid", str(pid), "-o", "pid="], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().split(") ")[1].startswith("Z")


@pytest.mark.slow
def test_concurrent_sdk_requests_spread_over_both_replicas(ray_server, oa):
    model = oa.models.list().data[0].id

    def completion(i: int) -> str:
        raw = oa.completions.with_raw_response.create(model=model, prompt=f"Fact {i}:", max_tokens=8,
                                                      extra_body=NO_EOS)
        assert raw.parse().choices[0].finish_reason == "length"
        return raw.headers[REPLICA_HEADER]

    def chat(i: int) -> str:
        raw = oa.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Say {i}."}], max_tokens=8,
            extra_body=NO_EOS)
        assert raw.parse().choices[0].message.content
        return raw.headers[REPLICA_HEADER]

    def streamed_chat(i: int) -> str:
        with oa.chat.completions.with_streaming_response.create(
                model=model, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=16,
                stream=True, extra_body=NO_EOS) as resp:
            chunks = list(resp.parse())
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        return resp.headers[REPLICA_HEADER]

    seen: list[str] = []
    # Ray's router picks the less busy of two running replicas, so 8 at once reach both. Rounds
    # go on for a while: on the 2-core CI machine the second replica's engine can still be starting
    # when the first answers (one CI run saw 24 requests, all on one replica, in the first rounds).
    deadline = time.monotonic() + 180
    with ThreadPoolExecutor(8) as pool:
        while len(set(seen)) < 2 and time.monotonic() < deadline:
            jobs = [pool.submit(completion, i) for i in range(4)] + \
                   [pool.submit(chat, i) for i in range(3)] + [pool.submit(streamed_chat, 30)]
            seen += [job.result() for job in jobs]
    assert len(set(seen)) == 2, f"all requests went to one replica: {seen}"


@pytest.mark.slow
def test_every_api_answers_through_the_proxy(ray_server):
    url, headers = ray_server.url, ray_server.headers()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    models = httpx.get(f"{url}/v1/models", headers=headers, timeout=10).json()
    model = models["data"][0]["id"]
    an = anthropic.Anthropic(api_key=API_KEY, base_url=url, max_retries=0, timeout=120)
    msg = an.messages.create(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}])
    assert msg.stop_reason in ("max_tokens", "end_turn") and msg.content[0].text
    with an.messages.stream(model=model, max_tokens=8, messages=[{"role": "user", "content": "Hi"}]) as s:
        assert s.get_final_message().stop_reason in ("max_tokens", "end_turn")
    # the replica's own guard and error format, not Ray's
    denied = httpx.post(f"{url}/v1/messages", json={}, timeout=10)
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert REPLICA_HEADER in denied.headers
    missing = httpx.post(f"{url}/v1/completions", headers=headers, timeout=10,
                         json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    metrics = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert metrics.status_code == 200 and "tokenmill:" in metrics.text
    # /v1/embeddings: a generation server answers 400, as without Ray
    emb = httpx.post(f"{url}/v1/embeddings", headers=headers, timeout=10, json={"input": "x"})
    assert emb.status_code == 400


def _stream(url: str, opened: list) -> tuple[str, list[dict], bool]:
    """A long streamed chat: (replica id, the `data:` payloads, whether the body ended cleanly)."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions", json={**LONG_CHAT, "stream": True}) as resp:
            assert resp.status_code == 200
            opened.append(resp.headers[REPLICA_HEADER])
            events = []
            try:
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        events.append(json.loads(line.removeprefix("data: ")))
            except httpx.HTTPError:
                return resp.headers[REPLICA_HEADER], events, False
            return resp.headers[REPLICA_HEADER], events, True


def _complete(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json=LONG_CHAT, timeout=120)


@pytest.mark.slow
def test_killed_replica_fails_its_requests_cleanly_and_is_replaced(ray_server):
    url = ray_server.url
    # Ray may be replacing a replica it found unhealthy on a loaded machine: start from two.
    deadline = time.monotonic() + 120
    while len(replica_pids()) != 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert len(replica_pids()) == 2
    wait_for_a_new_replica(url, before=set())  # both answer
    opened: list[str] = []
    with ThreadPoolExecutor(6) as pool:
        streams = [pool.submit(_stream, url, opened) for _ in range(4)]
        plain = [pool.submit(_complete, url) for _ in range(2)]
        deadline = time.monotonic() + 60
        while len(opened) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)  # tokens are flowing on every stream
        victim = replica_pid(ray_server, opened[0])
        cores = children(victim)  # its engine-core process (and multiprocessing's helper)
        assert cores
        os.kill(victim, signal.SIGKILL)
        results = [s.result(timeout=120) for s in streams]  # bounded: no request hangs
        answers = [p.result(timeout=120) for p in plain]

    by_replica: dict[str, list[tuple[list[dict], bool]]] = {}
    for replica, events, clean in results:
        by_replica.setdefault(replica, []).append((events, clean))
    failed = {r for r, runs in by_replica.items() if any("error" in ev[-1] for ev, _ in runs if ev)}
    assert failed == {opened[0]}, f"expected exactly the killed replica's streams to fail: {results}"
    for replica, runs in by_replica.items():
        for events, clean in runs:
            assert clean, "the proxy must end a stream whose replica died, not cut the connection"
            finishes = [c["finish_reason"] for ev in events if "choices" in ev for c in ev["choices"]]
            if replica in failed:  # an error chunk in OpenAI's format, never a fake finish
                assert events[-1]["error"]["type"] == "server_error"
                assert not any(finishes)
            else:
                assert finishes[-1] == "length"
    for resp in answers:  # each either finished on the survivor or got a 500 in OpenAI's format
        if resp.status_code == 200:
            assert resp.json()["choices"][0]["finish_reason"] == "length"
        else:
            assert resp.status_code == 500 and resp.json()["error"]["type"] == "server_error"

    # The killed replica's engine core notices its parent is gone and exits.
    deadline = time.monotonic() + 30
    while any(alive(p) for p in cores) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(p) for p in cores), "orphaned engine core"

    wait_for_a_new_replica(url, before=set(opened))


@pytest.mark.slow
def test_dead_engine_core_fails_its_stream_and_ray_replaces_the_replica(ray_server):
    """The replica lives but its engine core dies: the replica answers as `tokenmill serve` does
    (an error chunk), its health check fails, and Ray replaces it."""
    url = ray_server.url
    opened: list[str] = []
    with ThreadPoolExecutor(1) as pool:
        stream = pool.submit(_stream, url, opened)
        deadline = time.monotonic() + 60
        while not opened and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        os.kill(core_pid(ray_server.log(), replica_pid(ray_server, opened[0])), signal.SIGKILL)
        _, events, clean = stream.result(timeout=120)
    assert clean and events[-1]["error"]["type"] == "server_error"
    wait_for_a_new_replica(url, before=set(opened))


def wait_for_a_new_replica(url: str, before: set[str], timeout_s: float = 180) -> None:
    """Until requests all succeed and one is answered by a replica not in `before` (Ray's
    replacement)."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        if len(replica_pids()) == 2 and httpx.get(f"{url}/health", timeout=10).status_code == 200:
            with ThreadPoolExecutor(4) as pool:
                replies = list(pool.map(lambda _: _short(url), range(4)))
            ok = [r for r in replies if r.status_code == 200]
            # a replica whose engine died answers 503 until Ray has replaced it
            assert all(r.status_code == 503 for r in replies if r.status_code != 200)
            seen |= {r.headers[REPLICA_HEADER] for r in ok}
            if seen - before and len(ok) == len(replies):
                return
        time.sleep(2)
    raise AssertionError(f"no replacement replica answered within {timeout_s}s (seen {seen}, before {before})")


def _short(url: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
