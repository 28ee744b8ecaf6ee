"""`tokenmill run-batch` end to end with the real engines (embedded SmolLM2 for chat / completions,
bundled all-MiniLM-L6-v2 for embeddings): a file of good and malformed lines, a run killed part-way
(SIGKILL, plus a torn half-line as a crash mid-write leaves), and a rerun that resumes. Every
custom_id must be answered exactly once, every unreadable line must be one error line."""

from __future__ import annotations

import base64
import collections
import json
import os
import signal
import subprocess
import sys
import time

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def _line(custom_id, url, body) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _batch_file() -> tuple[list[str], set[str], dict[str, int], set[int]]:
    """(lines, custom_ids, expected status per custom_id, line numbers that must be error lines)."""
    chat = [{"role": "user", "content": "Name a color."}]
    lines: list[str] = []
    status: dict[str, int] = {}
    bad_lines: set[int] = set()

    def add(custom_id, url, body, code=200):
        lines.append(_line(custom_id, url, body))
        status[custom_id] = code

    def add_bad(raw):
        lines.append(raw)
        bad_lines.add(len(lines))  # 1-based line number

    for i in range(8):  # generation first, so the kill lands among them
        add(f"chat-{i}", "/v1/chat/completions",
            {"messages": chat, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    add_bad("this is not json")
    add("cmpl-0", "/v1/completions", {"prompt": "The sky is", "max_tokens": 8, "temperature": 0})
    add("cmpl-two", "/v1/completions", {"prompt": ["One, two,", "Paris is"], "max_tokens": 8, "temperature": 0})
    add_bad(json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}))  # no custom_id
    add_bad(_line("bad-url", "/v1/images/generations", {"prompt": "x"}))
    add_bad(_line("chat-0", "/v1/completions", {"prompt": "duplicate id"}))
    add("chat-badtemp", "/v1/chat/completions", {"messages": chat, "temperature": -1}, 400)
    add("cmpl-toolong", "/v1/completions", {"prompt": "word " * 600, "max_tokens": 4}, 400)
    add("emb-float", "/v1/embeddings", {"input": "What is a paged KV cache?"})
    add("emb-b64", "/v1/embeddings", {"input": ["alpha", "beta"], "encoding_format": "base64"})
    add("emb-ids", "/v1/embeddings", {"input": [101, 7592, 2088, 102]})
    add("emb-dims", "/v1/embeddings", {"input": "x", "dimensions": 64}, 400)  # not a Matryoshka model
    add("emb-empty", "/v1/embeddings", {"input": []}, 400)
    return lines, set(status), status, bad_lines


def _argv(inp: str, out: str) -> list[str]:
    return [sys.executable, "-m", "tokenmill.entrypoints.cli.main", "run-batch", "-i", inp, "-o", out,
            "--max-model-len", "512", "--chunk-size", "2"]


def _answered(path: str) -> list[str]:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        ids = []
        for raw in f:
            try:
                ids.append(json.loads(raw)["custom_id"])
            except (ValueError, KeyError):
                pass  # a line being written right now
        return [i for i in ids if i is not None]


def test_run_batch_interrupted_and_resumed(tmp_path):
    lines, custom_ids, status, bad_lines = _batch_file()
    inp, out = str(tmp_path / "requests.jsonl"), str(tmp_path / "results.jsonl")
    with open(inp, "w") as f:
        f.write("\n".join(lines) + "\n")

    # First run: killed without warning once the first chunk of results is on disk.
    proc = subprocess.Popen(_argv(inp, out), cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(_answered(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    first = _answered(out)
    assert 2 <= len(first) < len(custom_ids), "the first run was not interrupted part-way"
    with open(out, "a") as f:  # what a crash in the middle of a write leaves behind
        f.write('{"id": "batch_req-torn", "custom_id": "emb-fl')

    # Second run: finishes the rest, skipping what is already answered.
    done = subprocess.run(_argv(inp, out), cwd=_ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    # Skipped: the answered custom_ids and the unreadable lines whose error lines were written.
    assert f"{len(first) + len(bad_lines)} already done" in done.stdout, done.stdout

    with open(out) as f:
        results = [json.loads(raw) for raw in f]  # the torn line was cut: every line parses
    answered = collections.Counter(r["custom_id"] for r in results if r["custom_id"] is not None)
    assert set(answered) == custom_ids and set(answered.values()) == {1}
    error_lines = collections.Counter(r["error"]["line"] for r in results if r["custom_id"] is None)
    assert set(error_lines) == bad_lines and set(error_lines.values()) == {1}
    assert all(r["response"] is None and r["error"]["message"] for r in results if r["custom_id"] is None)

    by_id = {r["custom_id"]: r for r in results if r["custom_id"] is not None}
    for custom_id, code in status.items():
        response = by_id[custom_id]["response"]
        assert response["status_code"] == code, (custom_id, response)
        assert by_id[custom_id]["error"] is None
        if code == 400:
            assert response["body"]["error"]["type"] == "invalid_request_error"
    assert "512" in by_id["cmpl-toolong"]["response"]["body"]["error"]["message"]
    chat = by_id["chat-3"]["response"]["body"]
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"]
    assert chat["usage"]["completion_tokens"] == 12 and chat["model"] == "SmolLM2-135M-Instruct"
    two = by_id["cmpl-two"]["response"]["body"]
    assert [c["index"] for c in two["choices"]] == [0, 1] and all(c["text"] for c in two["choices"])
    emb = by_id["emb-b64"]["response"]["body"]
    assert emb["model"] == "all-MiniLM-L6-v2" and len(emb["data"]) == 2
    assert len(base64.b64decode(emb["data"][1]["embedding"])) == 384 * 4
    assert len(by_id["emb-float"]["response"]["body"]["data"][0]["embedding"]) == 384
    assert by_id["emb-ids"]["response"]["body"]["usage"]["prompt_tokens"] == 4
