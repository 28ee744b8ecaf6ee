"""`tokenmill serve --task embed` (the bundled all-MiniLM-L6-v2) driven by the official openai SDK:
float and base64 results equal `EmbeddingEngine`'s, usage, limits and 400s; the generation routes
and the generation server refuse the other kind of request."""

from __future__ import annotations

import base64
import concurrent.futures
import struct
import time

import httpx
import openai
import pytest

from conftest import API_KEY, serve_argv
from server_harness import running_server

TEXTS = ["What is a paged KV cache?", "Blocks of keys and values.", "Le chat dort sur le canapé.",
         "A much longer passage about attention: " + "queries meet keys, values are mixed. " * 20]


@pytest.fixture(scope="module")
def embed_server():
    def argv(port: int) -> list[str]:
        base = [a for a in serve_argv(port) if a not in ("--max-model-len", "512", "--max-num-seqs", "64")]
        return [*base, "--task", "embed"]

    with running_server(argv, api_key=API_KEY, ready_timeout_s=120) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference():
    """The same model in this process: what the server must return."""
    from tokenmill.engine.embedding_engine import EmbeddingEngine
    return EmbeddingEngine()


@pytest.fixture()
def client(embed_server):
    return openai.OpenAI(api_key=API_KEY, base_url=f"{embed_server.url}/v1", max_retries=0, timeout=60)


def _cos(a, b) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / ((sum(x * x for x in a) ** 0.5) * (sum(y * y for y in b) ** 0.5))


def test_models_lists_the_embedder(client):
    assert [m.id for m in client.models.list().data] == ["all-MiniLM-L6-v2"]


def test_float_matches_engine(client, reference):
    resp = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS, encoding_format="float")
    expected = reference.embed(TEXTS, use_tqdm=False)
    assert [d.index for d in resp.data] == list(range(len(TEXTS)))
    for d, e in zip(resp.data, expected):
        assert len(d.embedding) == 384
        assert _cos(d.embedding, e.outputs.embedding) > 0.999
    n_tokens = sum(len(e.prompt_token_ids) for e in expected)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == n_tokens


def test_base64_is_little_endian_float32(client, reference, embed_server):
    # The SDK decodes base64 itself; read the raw body too, to check the wire format.
    raw = httpx.post(f"{embed_server.url}/v1/embeddings", headers=embed_server.headers(),
                     json={"input": TEXTS[0], "encoding_format": "base64"}).json()
    blob = base64.b64decode(raw["data"][0]["embedding"])
    vec = struct.unpack(f"<{len(blob) // 4}f", blob)
    expected = reference.embed(TEXTS[0], use_tqdm=False)[0].outputs.embedding
    assert len(vec) == 384 and _cos(vec, expected) > 0.999
    # Asked for base64 explicitly, the SDK hands the string through; left to itself it asks for
    # base64 on the wire and decodes it to floats.
    sdk = client.embeddings.create(model="all-MiniLM-L6-v2", input=[TEXTS[0]], encoding_format="base64")
    assert sdk.data[0].embedding == raw["data"][0]["embedding"]
    auto = client.embeddings.create(model="all-MiniLM-L6-v2", input=[TEXTS[0]])
    assert len(auto.data[0].embedding) == 384 and _cos(auto.data[0].embedding, expected) > 0.999


def test_token_id_inputs(client, reference):
    ids = reference.tokenize([TEXTS[1]])[1][0]
    one = client.embeddings.create(model="all-MiniLM-L6-v2", input=ids)
    many = client.embeddings.create(model="all-MiniLM-L6-v2", input=[ids, ids[:4]])
    text = reference.embed(TEXTS[1], use_tqdm=False)[0].outputs.embedding
    assert _cos(one.data[0].embedding, text) > 0.999
    assert len(many.data) == 2 and many.usage.prompt_tokens == len(ids) + 4


def test_concurrent_requests_are_batched_correctly(client, reference):
    # Requests arriving together share forward passes; each still gets its own vectors, in order.
    expected = [e.outputs.embedding for e in reference.embed(TEXTS, use_tqdm=False)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(client.embeddings.create, model="all-MiniLM-L6-v2", input=[TEXTS[i % 4]])
                   for i in range(16)]
        for i, f in enumerate(futures):
            assert _cos(f.result().data[0].embedding, expected[i % 4]) > 0.999


def test_dimensions_refused_for_non_matryoshka_model(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="all-MiniLM-L6-v2", input="hi", dimensions=128)
    assert exc.value.body["param"] == "dimensions"


def test_too_long_input_names_both_numbers_unless_truncated(client):
    long_text = "word " * 600
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="all-MiniLM-L6-v2", input=["short", long_text])
    assert "256" in exc.value.message and "602" in exc.value.message
    assert exc.value.body["code"] == "context_length_exceeded"
    ok = client.embeddings.create(model="all-MiniLM-L6-v2", input=long_text,
                                  extra_body={"truncate_prompt_tokens": 256})
    assert ok.usage.prompt_tokens == 256


@pytest.mark.parametrize("body", [
    {"input": []}, {"input": ""}, {"input": [1, "a"]}, {"input": [[1], []]}, {"input": [True, False]},
    {"input": None}, {"input": {"text": "x"}}, {"input": [-1, 5]}, {"input": [10 ** 9]},
    {"input": "x", "encoding_format": "float16"}, {"input": "x", "dimensions": 0},
    {"input": ["x"] * 2049}, {"input": "x", "truncate_prompt_tokens": 100000},
])
def test_bad_inputs_are_400(embed_server, body):
    r = httpx.post(f"{embed_server.url}/v1/embeddings", headers=embed_server.headers(), json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and len(err["message"]) <= 1100


def test_unknown_model_auth_and_body_limits(embed_server):
    url = f"{embed_server.url}/v1/embeddings"
    assert httpx.post(url, json={"input": "x"}).status_code == 401
    r = httpx.post(url, headers=embed_server.headers(), json={"input": "x", "model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url, headers={**embed_server.headers(), "content-type": "text/plain"}, content=b"{}")
    assert r.status_code == 415
    r = httpx.post(url, headers=embed_server.headers(), json={"input": "x" * (9 * 1024 * 1024)})
    assert r.status_code == 413


def test_generation_routes_refuse_an_embedding_model(embed_server):
    h = embed_server.headers()
    r = httpx.post(f"{embed_server.url}/v1/chat/completions", headers=h,
                   json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    r = httpx.post(f"{embed_server.url}/v1/completions", headers=h, json={"prompt": "hi"})
    assert r.status_code == 400
    r = httpx.post(f"{embed_server.url}/v1/messages", headers=h,
                   json={"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(f"{embed_server.url}/health").status_code == 200
    assert embed_server.metric("prompt_tokens_total") > 0


def test_generation_server_refuses_embeddings(openai_client, model_name):
    with pytest.raises(openai.BadRequestError) as exc:
        openai_client.embeddings.create(model=model_name, input="hi")
    assert "embedding" in exc.value.message


def test_event_loop_stays_free_during_a_large_request(embed_server, client):
    # ~1,000 long passages take seconds on the worker thread; /health must not wait for them.
    passages = [f"{i} " + TEXTS[3] for i in range(1000)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        big = pool.submit(client.embeddings.create, model="all-MiniLM-L6-v2", input=passages)
        latencies = []
        while not big.done():
            t0 = time.monotonic()
            assert httpx.get(f"{embed_server.url}/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - t0)
            time.sleep(0.05)
        assert len(big.result().data) == 1000
    assert len(latencies) >= 5, "the large request finished too fast to observe the loop"
    assert max(latencies) < 1.0, latencies


def test_one_bad_input_does_not_fail_its_neighbours(embed_server):
    """Ten valid requests and one with a lone surrogate, sent while the worker is busy: only the
    bad one fails (400), whatever batch it would have shared (docs/reliability.md)."""
    bad = '{"input": "\\ud800"}'

    def post(i: int) -> int:
        if i == 5:
            return httpx.post(f"{embed_server.url}/v1/embeddings", content=bad, timeout=300,
                              headers={**embed_server.headers(), "content-type": "application/json"}).status_code
        return httpx.post(f"{embed_server.url}/v1/embeddings", headers=embed_server.headers(), timeout=300,
                          json={"input": [TEXTS[3]] * 8}).status_code

    for _ in range(3):
        with concurrent.futures.ThreadPoolExecutor(11) as pool:
            statuses = list(pool.map(post, range(11)))
        assert statuses[5] == 400 and statuses[:5] + statuses[6:] == [200] * 10
