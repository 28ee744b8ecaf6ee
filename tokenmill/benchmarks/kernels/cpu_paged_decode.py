"""The CPU paged-decode kernel (`ops/cpu_paged_decode.py`, the cache read in place) beside the path
it replaces (each request's blocks gathered, then SDPA with a padding mask), on one layer of a
model's attention shape: microseconds per call, best of several timed loops, and the ratio.

    python -m tokenmill.benchmarks.kernels.cpu_paged_decode [--heads 9 --kv-heads 3 --head-dim 64]
        [--batches 1,8,32] [--min-len 64 --max-len 192] [--layers 30] [--threads 2] [--output-json PATH]

The defaults are SmolLM2-135M's layer at the peer benchmark's batch and context (64 in, up to
128 out); the blocks of each request are scattered over the pool, as a busy cache leaves them.
Each timed call reads the next of `--layers` caches, as a step's layers do, so that the cache rows
come from memory as in the engine rather than from a cache that one layer's rows would fit.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from tokenmill.benchmarks.common import parse_cpu_kernel_args, write_json
from tokenmill.model.attention.cpu import paged_decode
from tokenmill.ops import cpu_paged_decode


def scattered_block_table(lens: list[int], block_size: int, gen: torch.Generator,
                          spare_columns: int = 0) -> tuple[torch.Tensor, int]:
    """A block table (int32) whose requests' blocks lie in random order over a pool a few blocks
    larger than they need, as a busy cache leaves them; the pool's size in blocks. Spare columns
    point at the pool's last block."""
    blocks = [-(-int(n) // block_size) for n in lens]
    pool = sum(blocks) + 8
    order = torch.randperm(pool, generator=gen).to(torch.int32)
    table = torch.full((len(lens), max(blocks) + spare_columns), pool - 1, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks):
        table[i, :n] = order[used:used + n]
        used += n
    return table, pool


def _inputs(batch: int, heads: int, kv_heads: int, head_dim: int, block_size: int, min_len: int, max_len: int,
            dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (batch,), generator=gen, dtype=torch.int32)
    table, pool = scattered_block_table(lens.tolist(), block_size, gen)
    shape = (pool, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, table, lens


def _best_us(fn, loops: int = 20, calls: int = 30) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=192)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--layers", type=int, default=30, help="distinct caches the calls cycle through")
    args = parse_cpu_kernel_args(parser)
    if not cpu_paged_decode.supports(args.head_dim):
        raise SystemExit("the CPU paged-decode kernel is not available here (see the warning above)")
    dtype = getattr(torch, args.dtype)
    scale = args.head_dim ** -0.5
    rows = []
    print(f"{args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, {args.dtype}, context "
          f"{args.min_len}-{args.max_len}, {torch.get_num_threads()} threads")
    for batch in (int(b) for b in args.batches.split(",")):
        layers = [_inputs(batch, args.heads, args.kv_heads, args.head_dim, args.block_size, args.min_len,
                          args.max_len, dtype, seed) for seed in range(args.layers)]

        def cycle(native: bool):
            turn = itertools.cycle(layers)
            return lambda: paged_decode(*next(turn), scale, 1.0, 1.0, native=native)

        kernel = _best_us(cycle(True), calls=max(30, args.layers))
        gather = _best_us(cycle(False), calls=max(30, args.layers))
        rows.append({"batch": batch, "kernel_us": kernel, "gather_sdpa_us": gather, "speedup": gather / kernel})
        print(f"batch {batch:>3}: kernel {kernel:8.1f} us   gather + SDPA {gather:8.1f} us   {gather / kernel:5.2f}x")
    write_json(args.output_json, {"benchmark": "cpu_paged_decode", "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
