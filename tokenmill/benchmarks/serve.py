"""`tokenmill bench serve`: load a running server like `vllm bench serve` does, and report.

Random dataset: each prompt is `--random-input-len` random token ids (sent as ids, so the input
length is exact), each asks for `--random-output-len` tokens (with `--ignore-eos`, exactly that
many). Requests arrive as a Poisson process at `--request-rate` (inf: all at once), at most
`--max-concurrency` in flight. Every request streams from `/v1/completions`; TTFT is the time to
the first token, ITL the gaps between streamed chunks, TPOT (latency - TTFT) / (output tokens - 1).
This is a benchmark: it prints numbers and writes JSON, it never asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)
    error: str = ""


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="benchmark a running tokenmill (or any OpenAI) server",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="default: http://HOST:PORT")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", default=None, help="default: the first model in /v1/models")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset-name", choices=("random",), default="random")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=128)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len * (1 - r), len * (1 + r)]")
    p.add_argument("--random-vocab-size", type=int, default=30000,
                   help="token ids are drawn from [100, this); keep it under the model's vocabulary")
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (Poisson arrivals); inf sends all at once")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-file", default=None, help="JSON output path (implies --save-result)")
    p.add_argument("--compare-offline", action="store_true",
                   help="afterwards run the same prompts through the offline LLM.generate in this "
                        "process (same model arguments as the server) and report the ratio")
    p.add_argument("--offline-model", default=None, help="model for --compare-offline (default embedded)")
    p.add_argument("--offline-max-num-seqs", type=int, default=256)
    p.add_argument("--offline-threads", type=int, default=None,
                   help="torch CPU threads for --compare-offline (default: torch's own choice)")
    p.set_defaults(func=run)
    return p


def make_random_dataset(args: argparse.Namespace) -> list[tuple[list[int], int]]:
    rng = random.Random(args.seed)

    def length(n: int) -> int:
        lo, hi = int(n * (1 - args.random_range_ratio)), int(n * (1 + args.random_range_ratio))
        return max(1, rng.randint(lo, hi) if hi > lo else n)

    return [([rng.randrange(100, args.random_vocab_size) for _ in range(length(args.random_input_len))],
             length(args.random_output_len)) for _ in range(args.num_prompts)]


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
               ignore_eos: bool) -> RequestResult:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True}}
    result = RequestResult(ok=False, prompt_len=len(prompt))
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                result.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return result
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "stream error")
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if not result.ttft_s:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last = now
        result.latency_s = time.perf_counter() - start
        result.ok = True
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
    return result


async def run_benchmark(args: argparse.Namespace, dataset: list[tuple[list[int], int]]) -> tuple[list[RequestResult], float]:
    base = args.base_url or f"http://{args.host}:{args.port}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or len(dataset) or 1)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=None, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        args.model = model
        semaphore = asyncio.Semaphore(args.max_concurrency or len(dataset) or 1)
        rng = random.Random(args.seed + 1)

        async def limited(prompt: list[int], max_tokens: int) -> RequestResult:
            async with semaphore:
                return await _one(client, args.endpoint, model, prompt, max_tokens, args.ignore_eos)

        start = time.perf_counter()
        tasks = []
        for prompt, max_tokens in dataset:
            tasks.append(asyncio.create_task(limited(prompt, max_tokens)))
            if args.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.request_rate))  # Poisson process
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def _stats(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {"mean": 0.0, "median": 0.0, "p99": 0.0}
    ordered = sorted(values_s)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"mean": 1000 * statistics.fmean(ordered), "median": 1000 * statistics.median(ordered),
            "p99": 1000 * p99}


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    input_tokens = sum(r.prompt_len for r in ok)
    tpots = [(r.latency_s - r.ttft_s) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration_s, "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s, "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": _stats([r.ttft_s for r in ok]), "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itl_s]),
    }


def print_summary(s: dict, args: argparse.Namespace) -> None:
    print(f"{' Serving Benchmark Result ':=^60}")
    rows = [("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
            ("Maximum request concurrency", args.max_concurrency), ("Request rate (req/s)", args.request_rate),
            ("Benchmark duration (s)", f"{s['duration_s']:.2f}"), ("Total input tokens", s["total_input_tokens"]),
            ("Total generated tokens", s["total_output_tokens"]),
            ("Request throughput (req/s)", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{s['total_token_throughput']:.2f}")]
    for name, key in (("Time to First Token", "ttft_ms"), ("Time per Output Token (excl. 1st token)", "tpot_ms"),
                      ("Inter-token Latency", "itl_ms")):
        rows.append((f"-- {name} --", ""))
        short = key.split("_")[0].upper()
        rows += [(f"{stat.capitalize()} {short} (ms)", f"{s[key][stat]:.2f}") for stat in ("mean", "median", "p99")]
    for name, value in rows:
        print(f"{name:<44}{value}")
    if "offline_output_throughput" in s:
        print(f"{'Offline LLM.generate output tok/s':<44}{s['offline_output_throughput']:.2f}")
        print(f"{'Server / offline output tok/s':<44}{s['server_vs_offline']:.3f}")
    if s["errors"]:
        print("errors:", s["errors"])
    print("=" * 60)


def offline_throughput(args: argparse.Namespace, dataset: list[tuple[list[int], int]]) -> float:
    """Output tok/s of the offline engine (what `LLM.generate` runs) on the same prompts, in this process."""
    from tokenmill.config import EngineArgs
    from tokenmill.engine.llm_engine import LLMEngine
    from tokenmill.sampling_params import SamplingParams

    if args.offline_threads:
        import torch

        torch.set_num_threads(args.offline_threads)
    engine = LLMEngine.from_engine_args(EngineArgs(model=args.offline_model, max_num_seqs=args.offline_max_num_seqs))

    def generate(items: list[tuple[list[int], int]]) -> int:
        for i, (prompt, n) in enumerate(items):
            engine.add_request(str(i), prompt, SamplingParams(max_tokens=n, temperature=0.0,
                                                               ignore_eos=args.ignore_eos))
        tokens = 0
        while engine.has_unfinished_requests():
            tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        return tokens

    generate(dataset[:2])  # warm-up, as the server is already warm
    start = time.perf_counter()
    tokens = generate(dataset)
    return tokens / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> dict:
    dataset = make_random_dataset(args)
    results, duration = asyncio.run(run_benchmark(args, dataset))
    summary = summarize(results, duration)
    if args.compare_offline:
        summary["offline_output_throughput"] = offline_throughput(args, dataset)
        summary["server_vs_offline"] = summary["output_throughput"] / summary["offline_output_throughput"]
    print_summary(summary, args)
    if args.save_result or args.result_file:
        path = args.result_file or f"bench-serve-c{args.max_concurrency}-{int(time.time())}.json"
        config = {k: v for k, v in vars(args).items() if k != "func"}
        with open(path, "w") as f:
            json.dump({"config": config, "results": summary,
                       "per_request": [asdict(r) for r in results]}, f, indent=1)
        print(f"results written to {path}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="tokenmill bench")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
