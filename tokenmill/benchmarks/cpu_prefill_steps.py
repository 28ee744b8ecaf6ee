"""How long one engine step takes while a long prompt is prefilled in chunks, per chunk size.

The CPU default of `max_num_batched_tokens` is the largest chunk whose slowest step stays near
one second on the default model (docs/reliability.md). Runs the real `EngineCore` in-process with
the engine core's thread count in `tokenmill serve` (all cores but one):

    python3 -m tokenmill.benchmarks.cpu_prefill_steps --prompt-tokens 8180 --chunks 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tokenmill.config import EngineArgs
from tokenmill.engine.core_process import cpu_threads_for_core
from tokenmill.engine.engine_core import EngineCore
from tokenmill.core.messages import EngineRequest
from tokenmill.sampling_params import SamplingParams


def step_times(chunk: int, prompt_tokens: int, model: str | None) -> list[float]:
    config = EngineArgs(model=model, device="cpu", max_num_batched_tokens=chunk,
                        enable_prefix_caching=False).create_engine_config()
    engine = EngineCore(config)
    try:
        vocab = config.model.vocab_size
        ids = [(7919 * i) % (vocab - 100) + 50 for i in range(prompt_tokens)]
        engine.add_request(EngineRequest("long", ids, SamplingParams(max_tokens=1), time.time()))
        times = []
        while engine.has_unfinished_requests():
            start = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - start)
        return times
    finally:
        engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=8180)
    parser.add_argument("--chunks", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--threads", type=int, default=None, help="default: as the server's engine core")
    args = parser.parse_args()
    threads = cpu_threads_for_core(args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    print(f"torch threads: {torch.get_num_threads()}")
    results = {}
    for chunk in args.chunks:
        times = step_times(chunk, args.prompt_tokens, args.model)
        results[chunk] = {"steps": len(times), "max_s": max(times), "mean_s": sum(times) / len(times),
                          "total_s": sum(times)}
        print(f"chunk {chunk:5d}: {len(times):3d} steps, slowest {max(times):.2f} s, "
              f"mean {sum(times) / len(times):.2f} s, total {sum(times):.1f} s", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
