"""`tokenmill bench concurrency`: the load of `vllm bench serve --max-concurrency C` without the
HTTP server: N random-token prompts, at most C in flight (a new one starts when one finishes),
stepped by the in-process engine. Reports per-request TTFT and TPOT (`(latency - TTFT) / (output
tokens - 1)`, as `bench serve` computes it) and the output throughput. Needs no tokenizer, so it
runs on dummy-weight model shapes; the HTTP, streaming and detokenization costs of a real server
are not in it (`tokenmill bench serve` measures those).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from tokenmill.benchmarks.common import sync, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("concurrency", help="bench-serve-style load, in process: TTFT, TPOT at C in flight",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--max-concurrency", type=int, default=10)
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p


def closed_loop(llm: Any, prompts: list[list[int]], output_len: int, max_concurrency: int) -> dict:
    """Run `prompts` through `llm`'s engine with at most `max_concurrency` in flight; per-request
    timings and the totals."""
    from tokenmill.sampling_params import RequestOutputKind, SamplingParams

    engine = llm.engine
    device = engine.config.device
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    pending = list(enumerate(prompts))
    started: dict[str, float] = {}
    first: dict[str, float] = {}
    counts: dict[str, int] = {}
    done: dict[str, float] = {}
    sync(device)
    begin = time.perf_counter()
    while pending or len(done) < len(started):
        while pending and len(started) - len(done) < max_concurrency:
            index, prompt = pending.pop(0)
            request_id = f"load-{index}"
            engine.add_request(request_id, prompt, params)
            started[request_id] = time.perf_counter()
            counts[request_id] = 0
        for out in engine.step():
            now = time.perf_counter()
            new = len(out.outputs[0].token_ids)
            if new and out.request_id not in first:
                first[out.request_id] = now
            counts[out.request_id] += new
            if out.finished:
                done[out.request_id] = now
    elapsed = time.perf_counter() - begin
    ttft = [first[r] - started[r] for r in done]
    tpot = [(done[r] - first[r]) / (counts[r] - 1) for r in done if counts[r] > 1]
    output_tokens = sum(counts.values())
    return {"num_prompts": len(prompts), "max_concurrency": max_concurrency, "duration_s": elapsed,
            "output_tokens": output_tokens, "output_tok_per_s": output_tokens / elapsed,
            "mean_ttft_ms": 1000 * statistics.mean(ttft), "median_ttft_ms": 1000 * statistics.median(ttft),
            "mean_tpot_ms": 1000 * statistics.mean(tpot), "median_tpot_ms": 1000 * statistics.median(tpot),
            "p99_tpot_ms": 1000 * sorted(tpot)[max(0, int(0.99 * len(tpot)) - 1)]}


def print_summary(label: str, s: dict) -> None:
    print(f"{label}: {s['num_prompts']} prompts, {s['max_concurrency']} in flight: {s['duration_s']:.1f} s, "
          f"{s['output_tok_per_s']:.1f} output tok/s; TTFT mean {s['mean_ttft_ms']:.0f} ms; "
          f"TPOT mean {s['mean_tpot_ms']:.2f} ms (median {s['median_tpot_ms']:.2f}, p99 {s['p99_tpot_ms']:.2f})")


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM
    from tokenmill.benchmarks.workloads import fixed_random_workload
    from tokenmill.config import EngineArgs

    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    config = llm.engine.config
    work = fixed_random_workload(args.num_prompts, args.input_len, args.output_len, config.model.vocab_size)
    closed_loop(llm, work.prompts[:2], 4, 2)  # warm-up
    summary = closed_loop(llm, work.prompts, args.output_len, args.max_concurrency)
    result = {"benchmark": "concurrency", "model": config.model.served_model_name, "device": str(config.device),
              "dtype": str(config.model.dtype).removeprefix("torch."), "input_len": args.input_len,
              "output_len": args.output_len, "tokenmill": summary}
    print_summary("tokenmill", summary)
    write_json(args.output_json, result)
    return result
