"""`tokenmill bench prefix`: what automatic prefix caching buys, measured against itself turned off.

Two workloads:
- `ttft` (default, CPU-friendly): a ~1,500-token document followed by different questions; time to
  the first token of a cold request against a repeat of the document with another question.
- `hit-rate`: N prompts of `--input-len` tokens whose first `h`% are shared (h in `--hit-rates`),
  `--output-len` new tokens each; throughput with the cache on against the cache off on the same
  prompts (the prefix-reuse workload of docs/perf.md).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tokenmill.benchmarks.common import sync, write_json

DOCUMENT = (
    "Section {i}. The harbour authority records every vessel that enters the bay, its tonnage, its "
    "cargo and the pilot who brought it in. In the winter of that year the ice closed the northern "
    "channel for six weeks, and the ledgers show ships waiting at anchor, their crews rationing "
    "coal while the town argued about whether to pay for an icebreaker. "
)
QUESTIONS = ["What closed the northern channel?", "How long was the channel closed?",
             "What does the harbour authority record?", "What did the town argue about?",
             "Who brought the vessels in?", "What were the crews rationing?"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("prefix", help="prefix caching: TTFT of repeats, or throughput by hit rate")
    p.add_argument("--workload", choices=("ttft", "hit-rate"), default="ttft")
    p.add_argument("--doc-tokens", type=int, default=1500, help="ttft: document length")
    p.add_argument("--repeats", type=int, default=3, help="ttft: repeats (median reported)")
    p.add_argument("--num-prompts", type=int, default=128, help="hit-rate: prompts per run")
    p.add_argument("--input-len", type=int, default=2048)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--hit-rates", default="0,25,50,75")
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p



def _ttft(llm, prompt: str) -> float:
    from tokenmill import SamplingParams
    sync(llm.engine.config.device)
    start = time.perf_counter()
    llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    sync(llm.engine.config.device)
    return time.perf_counter() - start


def run_ttft(args, engine_args) -> dict:
    from tokenmill import LLM

    llm = LLM(**vars(engine_args))
    tokenizer = llm.get_tokenizer()
    parts, i = [], 0
    while len(tokenizer.encode("".join(parts))) < args.doc_tokens:
        parts.append(DOCUMENT.format(i=i))
        i += 1
    document = "".join(parts)
    _ttft(llm, "Warm-up: hello")
    cold, warm = [], []
    for r in range(args.repeats):
        # A fresh document each repeat (a different first section), so the cold request is cold.
        doc = f"Archive copy {r}.\n" + document
        cold.append(_ttft(llm, doc + "\nQuestion: " + QUESTIONS[0]))
        warm.append(_ttft(llm, doc + "\nQuestion: " + QUESTIONS[1 + r % (len(QUESTIONS) - 1)]))
    cold_s, warm_s = sorted(cold)[len(cold) // 2], sorted(warm)[len(warm) // 2]
    n_tokens = len(tokenizer.encode(document))
    result = {"benchmark": "prefix-ttft", "document_tokens": n_tokens, "cold_ttft_s": cold_s,
              "repeat_ttft_s": warm_s, "speedup": cold_s / warm_s, "cold_all": cold, "repeat_all": warm}
    print(f"document {n_tokens} tokens: cold TTFT {cold_s * 1000:.0f} ms, repeat with another question "
          f"{warm_s * 1000:.0f} ms -> {cold_s / warm_s:.1f}x faster")
    return result


def _hit_rate_prompts(n: int, length: int, hit: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    shared_len = length * hit // 100
    shared = [rng.randrange(min(vocab, 10000)) for _ in range(shared_len)]
    return [shared + [rng.randrange(min(vocab, 10000)) for _ in range(length - shared_len)] for _ in range(n)]


def _throughput(llm, prompts, output_len: int) -> float:
    from tokenmill import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    # The shared prefix is computed once first (as a preceding request would), then timed.
    llm.generate(prompts[0], SamplingParams(max_tokens=1), use_tqdm=False)
    sync(llm.engine.config.device)
    start = time.perf_counter()
    outs = llm.generate(prompts[1:], params, use_tqdm=False)
    sync(llm.engine.config.device)
    elapsed = time.perf_counter() - start
    return sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) for o in outs) / elapsed


def run_hit_rate(args, engine_args) -> dict:
    from tokenmill import LLM

    hit_rates = [int(h) for h in args.hit_rates.split(",")]
    results: dict[str, dict[int, float]] = {}
    for caching in (False, True):
        engine_args.enable_prefix_caching = caching
        llm = LLM(**vars(engine_args))
        vocab = llm.engine.config.model.vocab_size
        # Warm-up at the measured sizes (Triton compiles per shape; the first run of the first
        # engine also pays CUDA's lazy start-up): with 64-token prompts the first measured point
        # (cache off, 0%) absorbed that cost and read ~10% low on the H100.
        warm_n = min(args.num_prompts, 32) + 1
        _throughput(llm, _hit_rate_prompts(warm_n, args.input_len, 0, vocab, 99), min(args.output_len, 16))
        runs = {}
        for h in hit_rates:
            prompts = _hit_rate_prompts(args.num_prompts + 1, args.input_len, h, vocab, seed=h)
            runs[h] = _throughput(llm, prompts, args.output_len)
            print(f"cache {'on ' if caching else 'off'} hit {h:2d}%: {runs[h]:.0f} tok/s (prompt + output)")
        results["on" if caching else "off"] = runs
        llm.shutdown()
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    ratios = {h: results["on"][h] / results["off"][h] for h in hit_rates}
    for h in hit_rates:
        print(f"hit {h:2d}%: cache on / off = {ratios[h]:.2f}x")
    return {"benchmark": "prefix-hit-rate", "input_len": args.input_len, "output_len": args.output_len,
            "num_prompts": args.num_prompts, "throughput_tok_s": results, "ratio_on_off": ratios}


def run(args: argparse.Namespace) -> dict:
    from tokenmill.config import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    result = run_ttft(args, engine_args) if args.workload == "ttft" else run_hit_rate(args, engine_args)
    write_json(args.output_json, result)
    return result
