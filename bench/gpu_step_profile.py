"""Where a decode step's GPU time goes: torch.profiler over a few engine steps at a fixed batch.

    python -m bench.gpu_step_profile --model qwen3-0.6b --batch 256 --input-len 256 [--steps 5]

Builds the engine with dummy weights, admits `--batch` token-id prompts, steps until every request
is decoding (past `--warm-steps` decode steps), then profiles `--steps` engine steps with CUDA
activity and prints the kernels by total GPU time, the GPU busy time per step and the wall time
per step. Run on the device (docs/perf.md quotes its output).
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
    args = p.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from tokenmill import LLM, SamplingParams

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_num_seqs=args.batch,
              max_model_len=args.input_len + args.warm_steps + args.steps + 64, gpu_memory_utilization=0.5,
              async_scheduling=not args.no_async_scheduling)
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
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
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


if __name__ == "__main__":
    main()
