"""Offline decode speed of the embedded model, as `LLM()` runs it: tokens/s of one greedy request.

    python3 -m tokenmill.benchmarks.offline_speed [--busy] [--max-tokens 128] [--repeat 3]

`--busy` starts a process that keeps one core busy for the whole run (a shared machine, a laptop
with a browser open), so the same command measures the idle and the loaded case. Prints one JSON
line: threads torch used, tokens/s per repeat, the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per repeat")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up")
    args = parser.parse_args()
    burner = None
    if args.busy:
        burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import torch
        from tokenmill import LLM, SamplingParams

        llm = LLM()
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        llm.generate("Once upon a time", params.clone(max_tokens=8), use_tqdm=False)
        rates = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            out = llm.generate("Once upon a time", params, use_tqdm=False)
            rates.append(round(len(out[0].outputs[0].token_ids) / (time.perf_counter() - start), 1))
        print(json.dumps({"busy": args.busy, "threads": torch.get_num_threads(), "tokens_per_s": rates,
                          "loadavg_1m": os.getloadavg()[0]}))
        llm.shutdown()
    finally:
        if burner is not None:
            burner.kill()


if __name__ == "__main__":
    main()
