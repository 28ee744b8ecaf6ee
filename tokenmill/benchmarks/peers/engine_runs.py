"""One engine's measurements, run in a process of its own: `python engine_runs.py SPEC.json OUT.json`.

It imports nothing from tokenmill, so the same file runs inside vLLM's virtual environment. Every
engine gets the same token ids (from the spec) and the same four measurements, each repeated:

- batch: all `batch` prompts at once, `output_len` tokens each (greedy, EOS ignored): output tok/s;
- decode: one prompt of `input_len` tokens, (time for 65 tokens - time for 1) / 64: ms per token;
- ttft: the time for 1 output token of that prompt;
- prefill: one prompt of `prefill_len` tokens, 1 output token: prompt tokens per second.

Peak memory is the largest resident set (VmHWM) of the process tree at the end.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def _vm_hwm_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            children = []
        pids += children
        frontier += children
    return pids


def peak_rss_mb(pid: int) -> float:
    """The summed peak resident sets of `pid` and its descendants, in MB."""
    return sum(_vm_hwm_kib(p) for p in _tree(pid)) / 1024


def measure(generate, spec: dict) -> dict:
    """`generate(prompts, max_tokens)` runs greedy generation to exactly `max_tokens` tokens."""
    single, long_prompt = spec["prompts"][:1], [spec["prefill_prompt"]]

    def timed(prompts, max_tokens) -> float:
        start = time.perf_counter()
        generate(prompts, max_tokens)
        return time.perf_counter() - start

    timed(spec["prompts"][:2], 4)  # warm-up
    batch, decode, ttft, prefill = [], [], [], []
    for _ in range(spec["repeats"]):
        one = timed(single, 1)
        full = timed(single, 65)
        ttft.append(one * 1000)
        decode.append((full - one) / 64 * 1000)
        prefill.append(len(long_prompt[0]) / timed(long_prompt, 1))
        batch.append(len(spec["prompts"]) * spec["output_len"] / timed(spec["prompts"], spec["output_len"]))
    return {"batch_tok_s": batch, "decode_ms": decode, "ttft_ms": ttft, "prefill_tok_s": prefill,
            "medians": {k: statistics.median(v) for k, v in
                        (("batch_tok_s", batch), ("decode_ms", decode), ("ttft_ms", ttft),
                         ("prefill_tok_s", prefill))}}


def run_tokenmill(spec: dict) -> dict:
    import torch

    from tokenmill import LLM, SamplingParams

    torch.set_num_threads(spec["threads"])
    start = time.perf_counter()
    llm = LLM(spec["model"], **spec["engine_args"])
    startup = time.perf_counter() - start

    def generate(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)

    return {"startup_s": startup, **measure(generate, spec)}


def run_vllm(spec: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(spec["model"], **spec["engine_args"])
    startup = time.perf_counter() - start

    def generate(prompts, n):
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    return {"startup_s": startup, **measure(generate, spec)}


def run_llamacpp(spec: dict) -> dict:
    """llama-server with one slot per batch prompt and continuous batching, driven over HTTP."""
    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [spec["server"], "-m", spec["model"], "--port", str(port), "-t", str(spec["threads"]),
           "-tb", str(spec["threads"]), "-c", str(spec["ctx"]), "-np", str(len(spec["prompts"])), "-cb",
           "--host", "127.0.0.1",
           "--kv-unified", "--no-webui", "-ngl", "0"]
    start = time.perf_counter()
    log = open("llama-server.log", "w")  # in the run's temporary directory
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.perf_counter() - start > 600:
                log.flush()
                with open("llama-server.log") as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}\n{tail}")
            time.sleep(0.5)
        startup = time.perf_counter() - start

        def one(prompt, n):
            body = json.dumps({"prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True,
                               "cache_prompt": False, "samplers": ["top_k"], "top_k": 1}).encode()
            req = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=3600) as r:
                out = json.loads(r.read())
            if out.get("tokens_predicted", n) != n:
                raise RuntimeError(f"llama-server predicted {out.get('tokens_predicted')} tokens, not {n}")

        pool = ThreadPoolExecutor(len(spec["prompts"]))

        def generate(prompts, n):
            list(pool.map(lambda p: one(p, n), prompts))

        result = {"startup_s": startup, **measure(generate, spec)}
        result["server_peak_rss_mb"] = peak_rss_mb(server.pid)
        return result
    finally:
        server.terminate()
        server.wait(timeout=60)


RUNNERS = {"tokenmill": run_tokenmill, "vllm": run_vllm, "llamacpp": run_llamacpp}

if __name__ == "__main__":  # vLLM's CPU build spawns processes: its work must sit behind this guard
    spec_path, out_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    result = RUNNERS[spec["runner"]](spec)
    result["peak_rss_mb"] = peak_rss_mb(os.getpid()) + result.pop("server_peak_rss_mb", 0.0)
    with open(out_path, "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    os._exit(0)  # engines leave worker processes and threads behind; the result is written
