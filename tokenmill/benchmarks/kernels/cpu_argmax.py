"""The CPU greedy-pick kernel (`ops/cpu_argmax.py`) beside torch.argmax, on float32 logits.

    python -m tokenmill.benchmarks.kernels.cpu_argmax [--vocab 49152] [--batches 1,8,32] [--threads 2]

The default vocabulary is the embedded SmolLM2-135M's; each figure is the best of 20 loops of 30
calls, on random logits (so the index pass stops halfway on average).
"""

from __future__ import annotations

import argparse

import torch

from tokenmill.benchmarks.common import parse_cpu_kernel_args, write_json
from tokenmill.benchmarks.kernels.cpu_paged_decode import _best_us
from tokenmill.ops import cpu_argmax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batches", default="1,8,32")
    args = parse_cpu_kernel_args(parser)
    print(f"vocabulary {args.vocab}, float32, {torch.get_num_threads()} threads")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        logits = torch.randn(batch, args.vocab, generator=torch.Generator().manual_seed(batch))
        assert torch.equal(cpu_argmax.argmax(logits), logits.argmax(dim=-1))
        kernel = _best_us(lambda: cpu_argmax.argmax(logits))
        torch_us = _best_us(lambda: logits.argmax(dim=-1))
        rows.append({"batch": batch, "kernel_us": kernel, "torch_us": torch_us, "speedup": torch_us / kernel})
        print(f"batch {batch:>3}: kernel {kernel:8.1f} us   torch.argmax {torch_us:8.1f} us   "
              f"{torch_us / kernel:5.2f}x")
    write_json(args.output_json, {"benchmark": "cpu_argmax", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
