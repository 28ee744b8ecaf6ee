"""The RL routes of a real `tokenmill serve` (docs/rl.md): weight updates from disk, from a trainer
over a gloo group and over checkpoint-engine's IPC protocol (through /collective_rpc) give what a
fresh engine on the new weights gives; sleep/wake round trips; requests arriving while asleep or
paused wait (or get 503 with --requests-while-paused reject); pause aborts, waits for or keeps the
requests in flight; every route is behind the API key, and absent without its flag."""

from __future__ import annotations

import json
import multiprocessing
import sys
import tempfile
import threading
import time

import httpx
import pytest

from rl_models import free_port as _free_port, join, make_checkpoints, trainer_broadcast, trainer_ipc_stream
from server_harness import running_server
from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.slow

KEY = "sk-rl"
PROMPT = "The weights of a language model"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoints(str(tmp_path_factory.mktemp("rl-server")), with_tokenizer=True)


@pytest.fixture(scope="module")
def expected(ckpt):
    """Greedy text of fresh engines on A and on B (offline: the same tokenizer and math)."""
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    texts = {}
    for name, path in (("a", ckpt.a), ("b", ckpt.b)):
        with LLM(path, dtype="float32", kv_cache_memory=16 << 20) as llm:
            texts[name] = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].text
    assert texts["a"] != texts["b"]
    return texts


def _argv(model: str, *flags: str):
    def make(port: int) -> list[str]:
        return [sys.executable, "-m", "tokenmill.entrypoints.cli.main", "serve", model, "--port", str(port),
                "--api-key", KEY, "--dtype", "float32", "--kv-cache-memory", str(16 << 20), *flags]
    return make


@pytest.fixture(scope="module")
def server(ckpt):
    with running_server(_argv(ckpt.a, "--enable-sleep-mode", "--enable-weight-updates"), api_key=KEY) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as c:
        yield c


def _complete(client: httpx.Client, max_tokens: int = MAX_TOKENS) -> dict:
    resp = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                                                "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()["choices"][0]


def _in_thread(fn):
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    return thread, result


def _held_until(client: httpx.Client, release: str) -> dict:
    """A completion sent now is held (still unanswered a second later) until `release` is posted;
    then it is served. Returns its choice."""
    thread, result = _in_thread(lambda: _complete(client))
    time.sleep(1.0)
    assert thread.is_alive()
    assert client.post(release).status_code == 200
    thread.join(60)
    return result["value"]


def test_update_from_disk_and_sleep_round_trip(server, client, ckpt, expected):
    assert _complete(client)["text"] == expected["a"]
    resp = client.post("/update_weights_from_disk", json={"model_path": ckpt.b})
    assert resp.status_code == 200 and resp.json()["num_parameters"] == 15
    assert _complete(client)["text"] == expected["b"]
    assert client.post("/sleep", params={"level": 1}).status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": True}
    # A request arriving while asleep waits (the default) and is served once awake.
    assert _held_until(client, "/wake_up")["text"] == expected["b"]
    assert client.get("/is_sleeping").json() == {"is_sleeping": False}
    # Level 2, weights pushed back to A before the KV cache returns.
    assert client.post("/sleep", params={"level": 2}).status_code == 200
    assert client.post("/wake_up", params={"tags": "weights"}).status_code == 200
    assert client.get("/is_sleeping").json() == {"is_sleeping": True}
    assert client.post("/update_weights_from_disk", json={"model_path": ckpt.a}).status_code == 200
    assert client.post("/wake_up", params={"tags": "kv_cache"}).status_code == 200
    assert _complete(client)["text"] == expected["a"]


def test_bad_calls_are_400_and_routes_need_the_key(server, client, ckpt):
    assert client.post("/sleep", params={"level": 3}).status_code == 400
    assert client.post("/update_weights_from_disk", json={"model_path": "/nonexistent"}).status_code == 400
    resp = client.post("/collective_rpc", json={"method": "shutdown"})
    assert resp.status_code == 400 and "not a worker extension method" in resp.json()["error"]["message"]
    assert client.post("/pause", params={"mode": "later"}).status_code == 400
    for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                         ("POST", "/reset_prefix_cache"), ("POST", "/collective_rpc")):
        assert httpx.request(method, f"{server.url}{path}").status_code == 401


def test_pause_modes(server, client, expected):
    def stream_finish(max_tokens: int) -> str:
        finish = None
        with client.stream("POST", "/v1/completions", json={"prompt": PROMPT, "max_tokens": max_tokens,
                                                            "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    finish = json.loads(line[6:])["choices"][0]["finish_reason"] or finish
        return finish

    # abort: the request in flight ends now, with finish_reason "abort".
    thread, result = _in_thread(lambda: stream_finish(480))
    _wait_running(server)
    assert client.post("/pause", params={"mode": "abort"}).json() == {"status": "paused"}
    thread.join(60)
    assert result["value"] == "abort"
    assert client.get("/is_paused").json() == {"is_paused": True}
    # While paused a new request waits; resume serves it.
    assert _held_until(client, "/resume")["text"] == expected["a"]
    # keep: the request stalls where it is and continues, unchanged, on resume.
    thread, result = _in_thread(lambda: _complete(client, max_tokens=400))
    _wait_running(server)
    assert client.post("/pause", params={"mode": "keep"}).status_code == 200
    time.sleep(0.5)
    assert thread.is_alive()
    assert client.post("/resume").status_code == 200
    thread.join(60)
    assert result["value"]["finish_reason"] == "length"
    assert result["value"]["text"].startswith(expected["a"])
    # wait: /pause returns once the request in flight finished on its own.
    thread, result = _in_thread(lambda: _complete(client, max_tokens=200))
    _wait_running(server)
    assert client.post("/pause", params={"mode": "wait"}).status_code == 200
    assert not thread.is_alive() and result["value"]["finish_reason"] == "length"
    assert client.post("/resume").status_code == 200


def _wait_running(server, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while server.metric("num_requests_running") < 1:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)


def test_update_from_trainer_group_and_ipc(server, client, ckpt, expected):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    trainer = ctx.Process(target=trainer_broadcast, args=(ckpt.b, port, 2, "weight_update_group"))
    trainer.start()
    try:
        resp = client.post("/init_weights_update_group", json={
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "backend": "gloo"})
        assert resp.status_code == 200, resp.text
        names = list(ckpt.weights_b)
        resp = client.post("/update_weights_from_distributed", json={
            "names": names, "dtypes": ["float32"] * len(names),
            "shapes": [list(ckpt.weights_b[n].shape) for n in names]})
        assert resp.status_code == 200, resp.text
    finally:
        assert join(trainer) == 0
    assert _complete(client)["text"] == expected["b"]
    assert client.post("/destroy_weights_update_group", json={}).status_code == 200
    # checkpoint-engine: POST /collective_rpc {"method": "update_weights_from_ipc", "args": [{uuid: address}]}
    address = f"ipc://{tempfile.mkdtemp(prefix='tm-ipc-')}/weights"
    ready = ctx.Event()
    trainer = ctx.Process(target=trainer_ipc_stream, args=(ckpt.a, address, 16 << 20, ready))
    trainer.start()
    try:
        assert ready.wait(60)
        [uuid] = client.post("/collective_rpc", json={"method": "report_device_id"}).json()["results"]
        resp = client.post("/collective_rpc", json={"method": "update_weights_from_ipc",
                                                    "args": [{uuid: address}], "timeout": 300})
        assert resp.status_code == 200 and resp.json() == {"results": [15]}
    finally:
        assert join(trainer) == 0
    assert _complete(client)["text"] == expected["a"]


def test_reject_policy_and_routes_off_without_flags(ckpt):
    with running_server(_argv(ckpt.a, "--enable-sleep-mode", "--requests-while-paused", "reject"),
                        api_key=KEY) as srv:
        with httpx.Client(base_url=srv.url, headers=srv.headers(), timeout=60) as c:
            assert c.post("/pause").status_code == 404  # --enable-weight-updates not given
            assert c.post("/sleep").status_code == 200
            resp = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
            assert resp.status_code == 503 and resp.headers["retry-after"]
            assert c.post("/wake_up").status_code == 200
            assert _complete(c)["finish_reason"] == "length"
    with running_server(_argv(ckpt.a), api_key=KEY) as srv:
        with httpx.Client(base_url=srv.url, headers=srv.headers(), timeout=60) as c:
            assert c.post("/sleep").status_code == 404
            assert c.post("/update_weights_from_disk", json={"model_path": ckpt.b}).status_code == 404
