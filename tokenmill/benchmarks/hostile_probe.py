"""The attacks of docs/reliability.md against a fresh `tokenmill serve` (defaults, embedded
SmolLM2-135M), with `/health` polled every 20 ms from a separate process. Prints one markdown row
per attack: requests tried, 4xx, 5xx, what leaked (requests left running or waiting, KV blocks
held, API-process RSS growth) and the slowest `/health` answer while it ran.

    python3 -m tokenmill.benchmarks.hostile_probe [--port 18790] [--skip-embed]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import time
from collections import Counter

import httpx

from tokenmill.benchmarks.common import wait_for_health

KEY = "sk-probe"
H = {"Authorization": f"Bearer {KEY}"}
USER = [{"role": "user", "content": "hi"}]


def poll_health(url: str, stop, out) -> None:
    worst, bad = 0.0, 0
    with httpx.Client(timeout=60) as c:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                bad += c.get(f"{url}/health").status_code != 200
            except httpx.HTTPError:
                bad += 1
            worst = max(worst, time.perf_counter() - start)
            stop.wait(0.02)
    out.put((worst, bad))


class Server:
    def __init__(self, port: int, extra: list[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(f"/tmp/hostile-probe-{port}.log", "wb")
        argv = [sys.executable, "-m", "tokenmill.entrypoints.cli.main", "serve", "--port", str(port),
                "--api-key", KEY, *extra]
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT)
        if not wait_for_health(self.url, self.proc, 600):
            raise RuntimeError("server did not start")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", headers=H, timeout=10).text
        pattern = rf"^tokenmill:{name}(?:{{[^}}]*}})? (\S+)$"
        return sum(float(m.group(1)) for m in re.finditer(pattern, text, re.M))

    def idle_state(self) -> tuple[float, float]:
        """(running + waiting, KV usage) once the engine settles (or after 60 s)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = self.metric("num_requests_running") + self.metric("num_requests_waiting")
            if busy == 0:
                break
            time.sleep(0.5)
        time.sleep(1.5)  # one idle heartbeat refreshes the gauges
        busy = self.metric("num_requests_running") + self.metric("num_requests_waiting")
        return busy, self.metric("kv_cache_usage_perc")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


ROWS: list[str] = []


def attack(server: Server, name: str, fn, note: str = "") -> None:
    if ONLY and name.split(".", 1)[0] not in ONLY:
        return
    ctx = multiprocessing.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    poller = ctx.Process(target=poll_health, args=(server.url, stop, out))
    poller.start()
    time.sleep(1.0)
    rss_before = server.rss_mb()
    statuses: list[int] = fn()
    stop.set()
    worst, bad = out.get()
    poller.join()
    busy, kv = server.idle_state()
    counts = Counter(statuses)
    leaks = f"{int(busy)} req, KV {100 * kv:.1f}%, RSS {server.rss_mb() - rss_before:+.0f} MB"
    row = (f"| {name} | {len(statuses)} | {sum(v for s, v in counts.items() if 400 <= s < 500)} | "
           f"{sum(v for s, v in counts.items() if s >= 500 and s != 529)} | {leaks} | {worst * 1000:.0f} ms"
           f"{f' ({bad} non-200)' if bad else ''} | {note or dict(sorted(counts.items()))} |")
    ROWS.append(row)
    print(row, flush=True)


def post(path: str, body=None, raw: bytes | None = None, timeout: float = 600) -> int:
    headers = {**H, "content-type": "application/json"}
    data = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(f"{URL}{path}", content=data, headers=headers, timeout=timeout).status_code


URL = ""


ONLY: set[str] = set()


def main() -> None:
    global URL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=18790)
    parser.add_argument("--skip-embed", action="store_true")
    parser.add_argument("--only", nargs="+", default=[],
                        help="attack numbers to run (e.g. 9a 4); default: all")
    args = parser.parse_args()
    ONLY.update(args.only)
    server = Server(args.port, [])
    URL = server.url
    model = httpx.get(f"{URL}/v1/models", headers=H).json()["data"][0]["id"]
    post("/v1/completions", {"prompt": "warm up", "max_tokens": 8})
    print(f"load average at start: {os.getloadavg()}")
    print("| attack | requests | 4xx | 5xx | leaks after (running+waiting, KV, API RSS) | worst /health "
          "| statuses |")
    print("|---|---|---|---|---|---|---|")
    try:
        run_attacks(server, model)
        if not args.skip_embed and (not ONLY or "6" in ONLY):
            embed = Server(args.port + 1, ["--task", "embed"])
            try:
                embed_rounds(embed.url, rounds=1, bad=False)  # the first passes size torch's buffers
                attack(embed, "6. embeddings: 10 valid + 1 '\\ud800', 5 rounds", lambda: embed_rounds(embed.url))
            finally:
                embed.stop()
    finally:
        server.stop()
    print("\n" + "\n".join(ROWS))


TEMPLATES = [
    {"chat_template_kwargs": {"chat_template": "{{ raise_exception('R:' ~ (7*7)) }}"}},
    {"chat_template_kwargs": {"chat_template": "{% for i in range(100000) %}{% for j in range(3000) %}"
                                               "{% endfor %}{% endfor %}"}},
    {"chat_template_kwargs": {"chat_template": "{% set s = 'x' * 200000000 %}{{ s }}"}},
    {"chat_template": "{{ strftime_now('%H:%M:%S') }}"},
    {"chat_template_kwargs": {"tokenize": True}},
]
GHOSTS = [{"n": 128, "structured_outputs": {"choice": "abc"}}, {"structured_outputs": {"json_object": "yes"}}]
ODD_FIELDS = [{"logit_bias": {"²": 1}}, {"structured_outputs": {"regex": 5}}, {"structured_outputs": {"grammar": 7}}]
LAX = [{"max_tokens": "10"}, {"max_tokens": True}, {"stream": "yes"}, {"stream": 0}, {"temperature": 2.5},
       {"stop_token_ids": [99_999_999]}, {"logprobs": "2"}]


def run_attacks(server: Server, model: str) -> None:
    chat = "/v1/chat/completions"
    attack(server, "1. request-supplied chat templates",
           lambda: [post(chat, {"messages": USER, **t}) for t in TEMPLATES for _ in range(4)])
    attack(server, "2. ghost requests (then one normal request)",
           lambda: [post(chat, {"messages": USER, "max_tokens": 2, **g}) for g in GHOSTS for _ in range(10)]
           + [post(chat, {"messages": USER, "max_tokens": 2})])
    stop = ["s" * 450_000] * 16
    attack(server, "3. int overflow with 16 x 450 KB stop strings",
           lambda: [post("/v1/completions", {"prompt": "hello", "max_tokens": 1, "priority": p, "stop": stop})
                    for p in (10**20, -10**20) for _ in range(20)]
           + [post("/v1/completions", {"prompt": "hello", "max_tokens": 1, **f})
              for f in ({"top_k": 10**20}, {"stop_token_ids": [10**20]})])
    note: list[str] = []
    attack(server, "4. one 8,180-token prompt + a short request", lambda: long_prompt(note))
    if note:
        ROWS[-1] = ROWS[-1].rsplit("|", 2)[0] + f"| {note[0]} |"
        print(ROWS[-1])
    text = "hello world, this is a prompt. " * 240_000
    big = [("/tokenize", {"prompt": text}), ("/v1/completions", {"prompt": text, "max_tokens": 1}),
           (chat, {"messages": [{"role": "user", "content": text}], "max_tokens": 1}),
           ("/v1/messages", {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": text}]})]
    raws = [(path, json.dumps(body).encode()) for path, body in big]
    attack(server, "5. 7.5 MB prompt on 4 routes (x3)", lambda: [post(p, raw=r) for p, r in raws for _ in range(3)])
    bombs = [json.dumps({"prompt": "a", "x": [json.loads("[" * 150 + "]" * 150)] * 25_000}).encode(),
             ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}").encode(),
             json.dumps({"prompt": "a", "x": list(range(800_000))}).encode(),
             json.dumps({"prompt": "a", "max_tokens": 1, "x": ["ab"] * 290_000}).encode()]
    attack(server, "7a. JSON bombs (nested, 100k deep, 800k ints, 290k strings) x3",
           lambda: [post("/v1/completions", raw=b) for b in bombs for _ in range(3)])
    lone = '{"role": "user", "content": "\\ud800"}'
    surrogate = [(chat, '{"messages": [%s]}' % lone), ("/v1/completions", '{"prompt": "\\ud800"}'),
                 ("/tokenize", '{"prompt": "\\ud800"}'),
                 ("/v1/messages", '{"model": "%s", "max_tokens": 2, "messages": [%s]}' % (model, lone)),
                 ("/v1/messages/count_tokens", '{"model": "%s", "messages": [%s]}' % (model, lone))]
    odd = [("/v1/completions", json.dumps({"prompt": "a", "max_tokens": 1, **o}).encode()) for o in ODD_FIELDS]
    attack(server, "7b. surrogates on 5 routes, logit_bias '²', regex 5, grammar 7, each + keep-alive reuse",
           lambda: keep_alive_pairs([(p, s.encode()) for p, s in surrogate] + odd))
    attack(server, "8. lax typing (+ [true] prompt, logprobs 'yes'; seed 2^63-1 n=2 must be 200)",
           lambda: [post("/v1/completions", {"prompt": "a", "max_tokens": 1, **f}) for f in LAX]
           + [post("/v1/completions", {"prompt": [True]}), post(chat, {"messages": USER, "logprobs": "yes"}),
              post("/v1/completions", {"prompt": "a", "max_tokens": 2, "n": 2, "seed": 2**63 - 1}),
              httpx.get(f"{URL}/v1/completions", headers=H).status_code])
    attack(server, "9a. 500 concurrent requests (32 tokens each)", lambda: asyncio.run(burst(500)))
    attack(server, "9b. 20 slow-header + 20 slow-body sockets", slow_clients)


def long_prompt(note: list[str]) -> list[int]:
    """An 8,180-token prompt, and 3 s later a short request: how long each took."""
    import threading

    ids = [(7919 * i) % 49000 + 50 for i in range(8180)]
    results: dict[str, tuple[int, float]] = {}

    def send(key: str, body: dict) -> None:
        start = time.monotonic()
        results[key] = (post("/v1/completions", body), time.monotonic() - start)

    long = threading.Thread(target=send, args=("long", {"prompt": ids, "max_tokens": 2}))
    long.start()
    time.sleep(3)
    send("short", {"prompt": "Hello", "max_tokens": 5})
    long.join()
    note.append(f"8180-token prompt {results['long'][1]:.0f} s; a short request sent 3 s later "
                f"answered in {results['short'][1]:.1f} s")
    return [results["long"][0], results["short"][0]]


def keep_alive_pairs(cases: list[tuple[str, bytes]]) -> list[int]:
    """Each bad request, then a good one on the same connection (a reset would show as 0)."""
    statuses = []
    with httpx.Client(base_url=URL, headers={**H, "content-type": "application/json"}, timeout=60) as c:
        for path, raw in cases:
            statuses.append(c.post(path, content=raw).status_code)
            try:
                good = c.post("/v1/completions", content=b'{"prompt": "a", "max_tokens": 1}')
                statuses.append(good.status_code)
            except httpx.HTTPError:
                statuses.append(0)
    return statuses


async def burst(n: int) -> list[int]:
    port = int(URL.rsplit(":", 1)[1])
    latencies: dict[int, list[float]] = {}

    async def one(i: int) -> int:
        body = {"prompt": f"Story {i}: once upon a time", "max_tokens": 32, "ignore_eos": True}
        data = json.dumps(body).encode()
        start = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                     + b"\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                     % len(data) + data)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        await reader.read()
        writer.close()
        latencies.setdefault(status, []).append(time.perf_counter() - start)
        return status

    statuses = await asyncio.gather(*[one(i) for i in range(n)])
    for status, values in sorted(latencies.items()):
        values.sort()
        print(f"    burst: {status} x{len(values)}: median {values[len(values) // 2]:.1f} s, "
              f"max {values[-1]:.1f} s")
    return list(statuses)


def slow_clients() -> list[int]:
    port = int(URL.rsplit(":", 1)[1])
    socks = []
    for i in range(40):
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
        if i < 20:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")  # headers never finish
        else:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer " + KEY.encode()
                      + b"\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"prompt\"")
        socks.append(s)
    statuses = []
    for s in socks:
        try:
            head = s.recv(4096)
            statuses.append(int(head.split()[1]) if head else 0)
        except OSError:
            statuses.append(0)
        s.close()
    return statuses


def embed_rounds(url: str, rounds: int = 5, bad: bool = True) -> list[int]:
    import concurrent.futures

    def one(i: int) -> int:
        if i == 5 and bad:
            return httpx.post(f"{url}/v1/embeddings", content=b'{"input": "\\ud800"}', timeout=120,
                              headers={**H, "content-type": "application/json"}).status_code
        return httpx.post(f"{url}/v1/embeddings", headers=H, json={"input": ["a passage to embed " * 20] * 50},
                          timeout=120).status_code

    statuses = []
    for _ in range(rounds):
        with concurrent.futures.ThreadPoolExecutor(11) as pool:
            statuses += list(pool.map(one, range(11)))
    return statuses


if __name__ == "__main__":
    main()
