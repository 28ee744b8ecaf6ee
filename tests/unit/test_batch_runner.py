"""run-batch file logic with fake backends: formats, error lines, resume, exactly-once."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from tokenmill.entrypoints.batch_runner import BatchRunner, read_done
from tokenmill.outputs import CompletionOutput, RequestOutput
from tokenmill.pooling_outputs import EmbeddingOutput, EmbeddingRequestOutput


class FakeGenerator:
    """Echoes the prompt back upper-cased; 'TOO LONG' in a prompt raises like the engine does."""

    def __init__(self, crash_after: int | None = None):
        self.calls: list[int] = []  # batch size of each call
        self.crash_after = crash_after

    def _out(self, prompt: str, params) -> RequestOutput:
        if "too long" in prompt:
            raise ValueError("prompt has 9999 tokens; max_model_len is 2048")
        if self.crash_after is not None and sum(self.calls) > self.crash_after:
            raise RuntimeError("engine died")
        text = prompt.upper()[: params.max_tokens or 100]
        samples = [CompletionOutput(i, text, list(range(len(text))), finish_reason="length") for i in range(params.n)]
        return RequestOutput("r", prompt, [1, 2, 3], samples, finished=True)

    def generate(self, prompts, sampling_params, use_tqdm=True):
        self.calls.append(len(prompts))
        return [self._out(p, sp) for p, sp in zip(prompts, sampling_params)]

    def chat(self, messages, sampling_params, use_tqdm=True, add_generation_prompt=True, chat_template_kwargs=None):
        self.calls.append(len(messages))
        return [self._out(conv[-1]["content"], sp) for conv, sp in zip(messages, sampling_params)]


class FakeEmbedder:
    def __init__(self):
        self.calls = 0

    def embed(self, inputs, truncate_prompt_tokens=None, use_tqdm=True, dimensions=None):
        self.calls += 1
        outs = []
        for x in inputs:
            ids = x if isinstance(x, list) else [ord(c) for c in x]
            if len(ids) > 50 and truncate_prompt_tokens is None:
                raise ValueError(f"input has {len(ids)} tokens; the model's maximum is 50")
            vec = [float(len(ids)), 0.5, -1.0][: dimensions or 3]
            outs.append(EmbeddingRequestOutput("e", None, ids[:50], EmbeddingOutput(vec)))
        return outs


def line(custom_id, url, body, method="POST"):
    return json.dumps({"custom_id": custom_id, "method": method, "url": url, "body": body})


def chat(cid, text, **kw):
    return line(cid, "/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": text}], **kw})


def write_input(tmp_path, lines):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def read_output(path):
    with open(path) as f:
        return [json.loads(x) for x in f]


@pytest.fixture
def mixed_lines():
    return [
        chat("c1", "hello"),
        line("p1", "/v1/completions", {"model": "m", "prompt": ["ab", "cd"], "n": 2, "max_tokens": 5}),
        line("e1", "/v1/embeddings", {"model": "m", "input": ["x", "yy"]}),
        line("e2", "/v1/embeddings", {"model": "m", "input": "zzz", "encoding_format": "base64"}),
        "{not json",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}),  # no custom_id
        line("u1", "/v1/images", {}),
        chat("c1", "duplicate id"),
        chat("bad-body", "hi", temperature="hot"),
        chat("c2", "this is too long"),
        line("e3", "/v1/embeddings", {"model": "m", "input": "q" * 60}),
        chat("s1", "hi", stream=True),
        "",  # blank lines are ignored
    ]


def test_formats_and_error_lines(tmp_path, mixed_lines):
    inp, outp = write_input(tmp_path, mixed_lines), str(tmp_path / "out.jsonl")
    gen, emb = FakeGenerator(), FakeEmbedder()
    summary = BatchRunner(lambda: gen, lambda: emb, model_name="m").run(inp, outp, use_tqdm=False)
    rows = read_output(outp)
    by_id = {r["custom_id"]: r for r in rows if r["custom_id"] is not None}
    unreadable = [r for r in rows if r["custom_id"] is None]

    assert set(by_id) == {"c1", "p1", "e1", "e2", "bad-body", "c2", "e3", "s1"}
    assert len(rows) == len(by_id) + len(unreadable)  # every custom_id exactly once
    assert sorted(r["error"]["line"] for r in unreadable) == [5, 6, 7, 8]
    assert all(r["response"] is None and r["error"]["message"] for r in unreadable)
    assert "duplicate custom_id 'c1'" in next(r for r in unreadable if r["error"]["line"] == 8)["error"]["message"]

    c1 = by_id["c1"]["response"]
    assert c1["status_code"] == 200 and by_id["c1"]["error"] is None
    assert c1["body"]["choices"][0]["message"] == {"role": "assistant", "content": "HELLO"}
    assert c1["body"]["object"] == "chat.completion" and c1["body"]["usage"]["prompt_tokens"] == 3

    p1 = by_id["p1"]["response"]["body"]
    assert [c["index"] for c in p1["choices"]] == [0, 1, 2, 3] and p1["choices"][2]["text"] == "CD"

    e1 = by_id["e1"]["response"]["body"]
    assert [d["index"] for d in e1["data"]] == [0, 1] and e1["data"][1]["embedding"] == [2.0, 0.5, -1.0]
    raw = base64.b64decode(by_id["e2"]["response"]["body"]["data"][0]["embedding"])
    assert list(struct.unpack("<3f", raw)) == [3.0, 0.5, -1.0]

    for cid, fragment in (("bad-body", "temperature"), ("c2", "max_model_len"), ("e3", "maximum is 50"),
                          ("s1", "stream")):
        resp = by_id[cid]["response"]
        assert resp["status_code"] == 400 and fragment in resp["body"]["error"]["message"], cid
    assert summary.succeeded == 4 and summary.failed == 4 + 4


def test_requests_are_batched(tmp_path):
    lines = [chat(f"c{i}", f"msg {i}") for i in range(10)] + [chat("long", "too long")]
    gen = FakeGenerator()
    BatchRunner(lambda: gen, None, chunk_size=100).run(write_input(tmp_path, lines), str(tmp_path / "o"),
                                                        use_tqdm=False)
    # One batched call for all 11, which fails on "too long", then one call per line to isolate it.
    assert gen.calls[0] == 11 and len(gen.calls) == 12


def test_missing_backend_answers_400(tmp_path):
    inp = write_input(tmp_path, [chat("c", "hi"), line("e", "/v1/embeddings", {"input": "x"})])
    BatchRunner(None, lambda: FakeEmbedder()).run(inp, str(tmp_path / "o"), use_tqdm=False)
    rows = {r["custom_id"]: r for r in read_output(tmp_path / "o")}
    assert rows["c"]["response"]["status_code"] == 400 and rows["e"]["response"]["status_code"] == 200


def test_interrupted_run_resumes_exactly_once(tmp_path, mixed_lines):
    lines = mixed_lines + [chat(f"n{i}", f"more {i}") for i in range(20)]
    inp, outp = write_input(tmp_path, lines), str(tmp_path / "out.jsonl")
    crashing = FakeGenerator(crash_after=8)
    with pytest.raises(RuntimeError, match="engine died"):
        BatchRunner(lambda: crashing, lambda: FakeEmbedder(), chunk_size=4).run(inp, outp, use_tqdm=False)
    first = read_output(outp)
    assert 0 < len(first) < 28
    with open(outp, "a") as f:
        f.write('{"id": "torn", "custom_id": "n19", "respo')  # a line cut by the crash
    summary = BatchRunner(lambda: FakeGenerator(), lambda: FakeEmbedder(), chunk_size=4).run(inp, outp,
                                                                                           use_tqdm=False)
    rows = read_output(outp)  # parses: the torn line was cut
    ids = [r["custom_id"] for r in rows if r["custom_id"] is not None]
    assert len(ids) == len(set(ids)) == 8 + 20
    assert sorted(r["error"]["line"] for r in rows if r["custom_id"] is None) == [5, 6, 7, 8]
    assert summary.skipped_done == len(first)
    # A third run has nothing left to do.
    again = BatchRunner(lambda: FakeGenerator(), lambda: FakeEmbedder()).run(inp, outp, use_tqdm=False)
    assert again.skipped_done == again.total_lines and len(read_output(outp)) == len(rows)


def test_read_done_on_missing_file(tmp_path):
    assert read_done(str(tmp_path / "nope.jsonl")) == (set(), set())
