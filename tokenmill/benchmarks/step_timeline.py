"""Where an offline batch's wall time goes, step by step: prefill-carrying steps vs pure decode.

    python -m tokenmill.benchmarks.step_timeline --model qwen3-0.6b --num-prompts 256 --input-len 256 --output-len 256

Runs the fixed-length random workload of `tokenmill bench throughput --workload random` through
`LLMEngine.step()` (after the same two-prompt warm-up) and times every step on the host. Each step
is classed by what it scheduled: steps that carry prompt tokens (prefill or chunked-prefill, run
eagerly) and pure decode steps (replayed from CUDA graphs). Also counts the Triton kernels compiled
inside the timed region, through a fresh `TRITON_CACHE_DIR` (a compile there is a stall a warm
server would not see). Prints a summary and the slowest steps; `--output-json` keeps every step.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def _cache_files(path: str) -> set[str]:
    return {os.path.join(root, f) for root, _, files in os.walk(path) for f in files}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", default=None, help="weight format (fp8: quantised at load)")
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--shared-pct", type=int, default=None,
                   help="the prompts of `tokenmill bench prefix --workload hit-rate` instead: the first "
                        "N%% of every prompt shared, computed once by a request before the timed run")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the two-prompt warm-up: count every compile after start-up")
    p.add_argument("--slowest", type=int, default=12)
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    cache_dir = os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tm_triton_"))
    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.benchmarks.prefix import _hit_rate_prompts
    from tokenmill.benchmarks.workloads import fixed_random_workload

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=args.max_model_len,
              max_num_batched_tokens=args.max_num_batched_tokens,
              gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
              quantization=args.quantization,
              async_scheduling=False if args.no_async_scheduling else None,
              enable_prefix_caching=not args.no_prefix_caching)
    engine = llm.engine
    config = engine.config
    vocab = config.model.vocab_size
    if args.shared_pct is None:
        prompts = fixed_random_workload(args.num_prompts, args.input_len, args.output_len, vocab).prompts
    else:
        prompts = _hit_rate_prompts(args.num_prompts + 1, args.input_len, args.shared_pct, vocab, seed=args.shared_pct)
    if not args.no_warmup:
        warm = fixed_random_workload(2, args.input_len, 4, vocab, seed=99).prompts
        llm.generate(warm, [SamplingParams(max_tokens=4, ignore_eos=True)] * 2, use_tqdm=False)
    if args.shared_pct is not None:  # the preceding request that leaves the shared prefix cached
        llm.generate(prompts[0], SamplingParams(max_tokens=1), use_tqdm=False)
        prompts = prompts[1:]
    sync = torch.cuda.synchronize if config.device.type == "cuda" else (lambda: None)
    sync()

    scheduled: list = []
    schedule = engine.core.scheduler.schedule

    def recording_schedule():
        out = schedule()
        scheduled.append(out)
        return out

    engine.core.scheduler.schedule = recording_schedule
    compiled_before = _cache_files(cache_dir)
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    steps = []
    last = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
        now = time.perf_counter()
        sched = scheduled[-1] if scheduled else None
        decodes = sum(1 for n in (sched.num_scheduled_tokens.values() if sched else ()) if n == 1)
        tokens = sched.total_num_scheduled_tokens if sched else 0
        steps.append({"ms": (now - last) * 1e3, "tokens": tokens, "decodes": decodes,
                      "prompt_tokens": tokens - decodes})
        last = now
    sync()
    elapsed = time.perf_counter() - start
    written = sorted(_cache_files(cache_dir) - compiled_before)
    # Triton writes <hash>/<kernel name>.<ir> files per compiled variant: name what was compiled.
    compiled_kernels = sorted({os.path.basename(f).split(".")[0] for f in written if f.endswith(".json")})

    prefill_steps = [s for s in steps if s["prompt_tokens"] > 0]
    decode_steps = [s for s in steps if s["prompt_tokens"] == 0 and s["tokens"] > 0]
    out_tokens = len(prompts) * args.output_len
    summary = {
        "model": args.model, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
        "async_scheduling": config.scheduler.async_scheduling, "shared_pct": args.shared_pct,
        "prefix_caching": config.cache.enable_prefix_caching, "seconds": elapsed,
        "output_tok_per_s": out_tokens / elapsed,
        "prompt_and_output_tok_per_s": (len(prompts) * args.input_len + out_tokens) / elapsed, "steps": len(steps),
        "prefill_steps": len(prefill_steps), "prefill_ms": sum(s["ms"] for s in prefill_steps),
        "decode_steps": len(decode_steps), "decode_ms": sum(s["ms"] for s in decode_steps),
        "other_ms": sum(s["ms"] for s in steps if s["tokens"] == 0),
        "triton_cache_files_written": len(written), "kernels_compiled_while_timed": compiled_kernels,
    }
    print(json.dumps(summary, indent=1))
    print(f"slowest {args.slowest} steps (index, ms, tokens, decodes):")
    for i, s in sorted(enumerate(steps), key=lambda e: -e[1]["ms"])[:args.slowest]:
        print(f"  {i:4d} {s['ms']:8.2f} {s['tokens']:6d} {s['decodes']:4d}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**summary, "per_step": steps}, f)


if __name__ == "__main__":
    main()
