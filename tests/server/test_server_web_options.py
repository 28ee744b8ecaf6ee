"""The server's web-facing options over the real server stack with a fake model: the playground
page, CORS (--allowed-origins), --root-path, HTTPS, request logging, vLLM metric names and the
inter-token latency of streamed and non-streamed requests."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import time

import httpx
import pytest

from server_harness import FAKE_SERVER, ServerProcess, free_port, start_fake_server

KEY = "sk-web-key"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    config = {"allowed_origins": ["https://app.example"], "metrics_prefix": "vllm",
              "log_requests": True, "max_log_len": 5}
    srv = start_fake_server(KEY, env={"FAKE_SERVER_CONFIG": json.dumps(config)})
    yield srv
    srv.stop()


def test_playground_page_needs_no_key_and_fetches_nothing_from_elsewhere(server):
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "tokenmill playground" in html and "v1/chat/completions" in html
    assert "http://" not in html and "https://" not in html and "<link" not in html  # no outside fetch
    assert httpx.get(f"{server.url}/playground").text == html
    assert httpx.get(f"{server.url}/v1/models").status_code == 401  # the API itself stays guarded


def test_cors_preflight_and_allowed_origin(server):
    preflight = httpx.options(f"{server.url}{CHAT}", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://app.example"
    other = httpx.get(f"{server.url}/v1/models", headers={"Origin": "https://evil.example", **server.headers()})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


def test_vllm_metric_names_and_inter_token_latency(server):
    def itl_count() -> float:
        text = httpx.get(f"{server.url}/metrics", headers=server.headers()).text
        assert "tokenmill:" not in text
        line = next(l for l in text.splitlines() if l.startswith("vllm:inter_token_latency_seconds_count"))
        return float(line.rsplit(" ", 1)[1])

    before = itl_count()
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
        assert client.post(CHAT, json={"messages": USER, "max_tokens": 4}).status_code == 200
        with client.stream("POST", CHAT, json={"messages": USER, "max_tokens": 4, "stream": True}) as r:
            r.read()
    deadline = time.monotonic() + 5
    while itl_count() < before + 6 and time.monotonic() < deadline:  # 3 gaps per 4-token request
        time.sleep(0.1)
    assert itl_count() == before + 6


def test_requests_are_logged_with_the_prompt_cut(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30) as client:
        client.post("/v1/completions", json={"prompt": "abcdefghijkl", "max_tokens": 2})
    time.sleep(0.2)
    line = next(l for l in server.log().splitlines() if "Received request cmpl-" in l)
    assert "prompt: 'abcde'" in line and "fghij" not in line


def test_root_path_behind_a_prefix_stripping_proxy():
    """With --root-path /llm the app answers the paths a proxy forwards (prefix stripped, as
    FastAPI's root_path means), and the key guard judges the same paths the routes see."""
    srv = start_fake_server(KEY, env={"FAKE_SERVE_KWARGS": json.dumps({"root_path": "/llm"})})
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 200  # unguarded, as without a prefix
        assert "tokenmill playground" in httpx.get(f"{srv.url}/").text
        assert httpx.get(f"{srv.url}/v1/models").status_code == 401
        assert httpx.get(f"{srv.url}/v1/models", headers=srv.headers()).json()["data"][0]["id"] == "fake-model"
    finally:
        srv.stop()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_with_ssl_keyfile_and_certfile(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
    port = free_port()
    srv = ServerProcess([sys.executable, FAKE_SERVER, str(port)], port,
                        env={"FAKE_SERVE_KWARGS": json.dumps({"ssl_keyfile": str(key), "ssl_certfile": str(cert)})})
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(f"https://127.0.0.1:{port}/health", timeout=1,
                                     verify=ssl.create_default_context(cafile=str(cert)))
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and srv.proc.poll() is None, srv.log()[-2000:]
                time.sleep(0.3)
        assert response.status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)  # plain HTTP is not served
    finally:
        srv.stop()
