"""The CPU one-row GEMV (`ops/cpu_gemv.py`) beside oneDNN's packed GEMM (what the compiled forward
and the LM head ran before), on bf16 weights at SmolLM2-135M's shapes.

    python -m tokenmill.benchmarks.kernels.cpu_gemv [--threads 2] [--stream-mb 200]

"from memory": each call takes the next of as many distinct copies of the weight as fill
`--stream-mb` (the model's 270 MB do not stay in the caches between tokens), so the figure is the
weight stream's; "hot": one copy, called again and again (the per-call cost shows at small shapes).
Each figure is the mean over three passes through the copies, or 500 hot calls.
"""

from __future__ import annotations

import argparse

import torch

from tokenmill.benchmarks.common import mean_call_us, parse_cpu_kernel_args, write_json
from tokenmill.ops import cpu_gemv

# (name, in_features, out_features) of one SmolLM2-135M layer's linears and its LM head.
SHAPES = [("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576), ("lm_head", 576, 49152)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream-mb", type=int, default=200, help="distinct weight copies per shape, in MB")
    args = parse_cpu_kernel_args(parser)
    print(f"bf16 weights, one bf16 row, {torch.get_num_threads()} threads; microseconds a call (GB/s of weights)")
    rows = []
    total = {"gemv_us": 0.0, "onednn_us": 0.0}
    for name, k, n in SHAPES:
        copies = max(1, args.stream_mb * 2**20 // (n * k * 2))
        gen = torch.Generator().manual_seed(n + k)
        weights = [torch.randn(n, k, generator=gen).bfloat16() for _ in range(copies)]
        packed = {id(w): torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in weights}
        x = torch.randn(1, k, generator=gen).bfloat16()
        ref = x.double() @ weights[0].double().T
        err = ((cpu_gemv.gemv(x, weights[0]).double() - ref).abs().max() / ref.abs().max()).item()
        ours = lambda w: cpu_gemv.gemv(x, w)  # noqa: E731
        onednn = lambda w: torch.ops.mkldnn._linear_pointwise(x, packed[id(w)], None, "none", [], "")  # noqa: E731
        row = {"shape": name, "k": k, "n": n, "copies": copies, "rel_err": err,
               "gemv_us": mean_call_us(ours, weights), "onednn_us": mean_call_us(onednn, weights),
               "gemv_hot_us": mean_call_us(ours, weights[:1] * 500, passes=1),
               "onednn_hot_us": mean_call_us(onednn, weights[:1] * 500, passes=1)}
        gb = n * k * 2 / 1e3
        rows.append(row)
        print(f"{name:8s} {k:5d} x {n:5d}: from memory GEMV {row['gemv_us']:7.1f} ({gb / row['gemv_us']:4.1f}) "
              f"oneDNN {row['onednn_us']:7.1f} ({gb / row['onednn_us']:4.1f}) = {row['onednn_us'] / row['gemv_us']:4.2f}x"
              f" | hot GEMV {row['gemv_hot_us']:6.1f} oneDNN {row['onednn_hot_us']:6.1f} | error {err:.1e}")
        layers = 30 if name != "lm_head" else 1
        total["gemv_us"] += layers * row["gemv_us"]
        total["onednn_us"] += layers * row["onednn_us"]
        del weights, packed
    print(f"a token's linears (30 layers + the LM head), from memory: GEMV {total['gemv_us'] / 1e3:.2f} ms, "
          f"oneDNN {total['onednn_us'] / 1e3:.2f} ms ({total['onednn_us'] / total['gemv_us']:.2f}x)")
    write_json(args.output_json, {"benchmark": "cpu_gemv", "args": vars(args), "rows": rows, "token": total})


if __name__ == "__main__":
    main()
