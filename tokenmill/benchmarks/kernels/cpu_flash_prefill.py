"""The AMX causal prefill kernel (`ops/cpu_flash_prefill.py`) beside SDPA's CPU flash kernel (what
the native attention op called before, and still calls where there are no tile units), on one
layer of a model's attention shape: milliseconds per prompt (median of timed calls, alternating
the two so a change in the machine's load hits both), and the ratio.

    python -m tokenmill.benchmarks.kernels.cpu_flash_prefill [--heads 9 --kv-heads 3 --head-dim 64]
        [--lengths 64,200,512,1500,3000] [--threads 2] [--output-json PATH]

The defaults are SmolLM2-135M's layer; q, k and v are views of one fused projection, as the
engine passes them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from tokenmill.benchmarks.common import parse_cpu_kernel_args, write_json
from tokenmill.ops import cpu_flash_prefill


def _sdpa(q, k, v, scale):
    heads_first = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*heads_first, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).squeeze(0).transpose(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", default="64,200,512,1500,3000")
    parser.add_argument("--calls", type=int, default=15)
    args = parse_cpu_kernel_args(parser)
    if not cpu_flash_prefill.supported(args.head_dim):
        raise SystemExit("the AMX prefill kernel does not run here (no tile units, or the head size)")
    scale = args.head_dim ** -0.5
    rows = []
    print(f"{args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, bf16, causal, "
          f"{torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(0)
    for length in (int(n) for n in args.lengths.split(",")):
        width = (args.heads + 2 * args.kv_heads) * args.head_dim
        qkv = torch.randn(length, width, generator=gen).to(torch.bfloat16)
        q = qkv[:, :args.heads * args.head_dim].view(length, args.heads, args.head_dim)
        k = qkv[:, args.heads * args.head_dim:(args.heads + args.kv_heads) * args.head_dim].view(
            length, args.kv_heads, args.head_dim)
        v = qkv[:, (args.heads + args.kv_heads) * args.head_dim:].view(length, args.kv_heads, args.head_dim)
        runs = {"kernel": lambda: cpu_flash_prefill.flash_prefill(q, k, v, scale), "sdpa": lambda: _sdpa(q, k, v, scale)}
        times = {name: [] for name in runs}
        for fn in runs.values():
            fn(), fn()
        for _ in range(args.calls):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - start) * 1e3)
        kernel, sdpa = statistics.median(times["kernel"]), statistics.median(times["sdpa"])
        rows.append({"tokens": length, "kernel_ms": kernel, "sdpa_ms": sdpa, "speedup": sdpa / kernel})
        print(f"{length:>5} tokens: kernel {kernel:8.3f} ms   SDPA {sdpa:8.3f} ms   {sdpa / kernel:5.2f}x")
    write_json(args.output_json, {"benchmark": "cpu_flash_prefill", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
