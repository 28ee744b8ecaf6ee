"""Where a decode step's GPU time goes: torch.profiler over a few engine steps at a fixed batch.

    python -m tokenmill.benchmarks.gpu_step_profile --model qwen3-0.6b --batch 256 --input-len 256 [--steps 5]

Builds the engine with dummy weights, admits `--batch` token-id prompts, steps until every request
is decoding (past `--warm-steps` decode steps), then profiles `--steps` engine steps with CUDA
activity and prints the kernels by total GPU time, the GPU busy time per step and the wall time
per step. Run on the device (docs/perf.md quotes its output).

`--tensor-parallel-size N` profiles rank 0 (it lives in this process). `--gaps` also prints where
the GPU sat idle between kernels (gaps over 1 us, by the kernel before and after), which the
kernel table cannot show: at batch 1 the step is ~300 short kernels and idle time between them.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-0.6b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--warm-steps", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--no-async-scheduling", action="store_true")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--quantization", default=None, help="e.g. fp8 (weights quantised at load)")
    p.add_argument("--gaps", action="store_true")
    p.add_argument("--stacks", action="store_true",
                   help="record Python stacks and print the ops that copied from pageable host memory")
    p.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                   help="dependent launches (on by default, as served); --no-pdl gives kernel durations "
                        "without the wait a dependent kernel spends on the one before")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5,
                   help="raise for shapes whose weights need more than half the GPU (qwen3-30b-a3b: 0.9)")
    p.add_argument("--max-model-len", type=int, help="default: just enough for the run")
    args = p.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from tokenmill import LLM, SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=args.batch,
              max_model_len=args.max_model_len or args.input_len + args.warm_steps + args.steps + 64,
              gpu_memory_utilization=args.gpu_memory_utilization,
              async_scheduling=not args.no_async_scheduling, tensor_parallel_size=args.tensor_parallel_size,
              kv_cache_dtype=args.kv_cache_dtype, quantization=args.quantization, pdl=args.pdl)
    engine = llm.engine
    vocab = llm.engine.config.model.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=args.warm_steps + args.steps + 32, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randrange(vocab) for _ in range(args.input_len)], params)
    while engine.core.scheduler.waiting or any(
            r.num_computed_tokens < r.num_prompt_tokens for r in engine.core.scheduler.running):
        engine.step()
    for _ in range(args.warm_steps):
        engine.step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=args.stacks) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    print(f"{args.model}, batch {args.batch}, context ~{args.input_len + args.warm_steps}: "
          f"wall {wall / args.steps * 1e3:.2f} ms/step, GPU busy {gpu_us / args.steps / 1e3:.2f} ms/step")
    print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
    if args.gaps:
        print_gaps(prof, args.steps)
    if args.stacks:
        issuers = pageable_copy_issuers(prof)
        print(f"\npageable host-to-device copies: {len(issuers)} in {args.steps} steps")
        print("\n".join(issuers[:10]))


def pageable_copy_issuers(prof) -> list[str]:
    """Each op whose kernels include a host-to-device copy from pageable memory (which may wait for
    the stream: `utils/transfer.py`), with the innermost frames of its Python stack (a profile
    recorded `with_stack=True`)."""
    return [f"{e.name}: {' <- '.join(e.stack[:8])}" for e in prof.events()
            if any("Pageable" in k.name and "HtoD" in k.name for k in e.kernels)]


def print_gaps(prof, steps: int) -> None:
    """Idle time between consecutive GPU kernels/copies, grouped by (kernel before, kernel after)."""
    from collections import defaultdict

    from torch.autograd import DeviceType

    kernels = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                      if e.device_type == DeviceType.CUDA), key=lambda t: t[0])
    if not kernels:
        print("gaps: no device events recorded")
        return
    span = kernels[-1][1] - kernels[0][0]
    by_pair: dict[tuple[str, str], list[float]] = defaultdict(list)
    sizes = defaultdict(float)
    total = 0.0
    end = kernels[0][1]
    prev_name = kernels[0][2]
    for start, stop, name in kernels[1:]:
        gap = start - end
        if gap > 0:
            total += gap
            bucket = "<1us" if gap < 1 else "1-3us" if gap < 3 else "3-10us" if gap < 10 else \
                "10-100us" if gap < 100 else ">=100us"
            sizes[bucket] += gap
            if gap >= 1:
                by_pair[(prev_name[:40], name[:40])].append(gap)
        if stop > end:
            end, prev_name = stop, name
    print(f"\ngaps: {len(kernels)} device events over {span / steps / 1e3:.3f} ms/step; idle between them "
          f"{total / steps / 1e3:.3f} ms/step")
    print("idle by gap size (ms/step): " + ", ".join(f"{k} {v / steps / 1e3:.3f}" for k, v in sizes.items()))
    rows = sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:15]
    print(f"{'kernel before':42s}{'kernel after':42s}{'count/step':>11s}{'mean us':>9s}{'ms/step':>9s}")
    for (a, b), gaps in rows:
        print(f"{a:42s}{b:42s}{len(gaps) / steps:11.1f}{sum(gaps) / len(gaps):9.2f}{sum(gaps) / steps / 1e3:9.3f}")


if __name__ == "__main__":
    main()
