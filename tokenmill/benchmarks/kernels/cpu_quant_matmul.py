"""The CPU kernel for GGUF blocks kept quantised (`ops/cpu_quant_matmul.py`: int8 activations,
VNNI integer dot products) beside PyTorch's weight-only kernels (`_weight_int4pack_mm_for_cpu` for
Q4_0 / Q4_1, `_weight_int8pack_mm` for Q8_0, what `--quantization gguf` ran before) and the bf16
GEMV on the dequantised weight, at SmolLM2-135M's shapes (Q4_1 linears, the Q8_0 LM head as the
shipped file has them).

    python -m tokenmill.benchmarks.kernels.cpu_quant_matmul [--threads 2] [--rows 1 32] [--stream-mb 200]

Weights are random GGUF blocks. As in `cpu_gemv`: each call takes the next of as many distinct
copies of the weight as fill `--stream-mb` ("from memory"; a token's weights do not stay in the
caches), mean over three passes through the copies.
"""

from __future__ import annotations

import argparse

import torch

from tokenmill.benchmarks.common import mean_call_us, parse_cpu_kernel_args, write_json
from tokenmill.ops import cpu_gemv, cpu_quant_matmul, gguf_blocks

# (name, in_features, out_features, GGUF block type) of one SmolLM2-135M layer and its LM head.
SHAPES = [("qkv", 576, 960, "Q4_1"), ("o", 576, 576, "Q4_1"), ("gate_up", 576, 3072, "Q4_1"),
          ("down", 1536, 576, "Q4_1"), ("lm_head", 576, 49152, "Q8_0")]


def random_rows(n: int, k: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    """GGUF rows of random blocks with plausible scales (uint8 [n, row bytes])."""
    cells = torch.randint(0, 256, (n, k // 32, gguf_blocks.BLOCK_BYTES[kind]), dtype=torch.uint8, generator=gen)
    cells[..., 0:2] = (torch.rand(n, k // 32, generator=gen) * 0.01 + 1e-3).half().view(torch.uint8).view(n, -1, 2)
    if kind == "Q4_1":
        cells[..., 2:4] = (-torch.rand(n, k // 32, generator=gen) * 0.08).half().view(torch.uint8).view(n, -1, 2)
    return cells.view(n, -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stream-mb", type=int, default=200, help="distinct weight copies per shape, in MB")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32], help="activation rows (tokens)")
    args = parse_cpu_kernel_args(parser)
    if not cpu_quant_matmul.available():
        raise SystemExit("the quantised kernel needs AVX512-VNNI, which this CPU lacks")
    print(f"{torch.get_num_threads()} threads, bf16 activations; microseconds a call (GB/s of quantised weights)")
    rows = []
    totals: dict[int, dict[str, float]] = {}
    for m in args.rows:
        total = totals.setdefault(m, {"ours_us": 0.0, "torch_us": 0.0, "bf16_us": 0.0})
        for name, k, n, kind in SHAPES:
            gen = torch.Generator().manual_seed(n + k)
            nbytes = n * k // 32 * gguf_blocks.BLOCK_BYTES[kind]
            copies = max(1, args.stream_mb * 2**20 // nbytes)
            raws = [random_rows(n, k, kind, gen) for _ in range(copies)]
            ours_w = [cpu_quant_matmul.pack(r, kind) for r in raws]
            torch_w = [gguf_blocks.pack_int4(r, kind, torch.bfloat16) if kind != "Q8_0"
                       else gguf_blocks.pack_int8(r, torch.bfloat16) for r in raws]
            x = torch.randn(m, k, generator=gen).bfloat16()
            ref = x.double() @ gguf_blocks.dequantize(raws[0], kind).double().T
            err = ((cpu_quant_matmul.matmul(x, ours_w[0]).double() - ref).abs().max() / ref.abs().max()).item()
            kernel = gguf_blocks.int4_linear if kind != "Q8_0" else gguf_blocks.int8_linear
            row = {"shape": name, "kind": kind, "rows": m, "k": k, "n": n, "copies": copies, "rel_err": err,
                   "ours_us": mean_call_us(lambda w: cpu_quant_matmul.matmul(x, w), ours_w),
                   "torch_us": mean_call_us(lambda w: kernel(x, *w), torch_w)}
            if m == 1:  # the bf16 GEMV on the dequantised weight: what the bf16 engine streams
                bf16 = [gguf_blocks.dequantize(r, kind).bfloat16() for r in raws[:max(1, copies // 4)]]
                row["bf16_gemv_us"] = mean_call_us(lambda w: cpu_gemv.gemv(x, w), bf16)
                del bf16
            rows.append(row)
            layers = 30 if name != "lm_head" else 1
            total["ours_us"] += layers * row["ours_us"]
            total["torch_us"] += layers * row["torch_us"]
            total["bf16_us"] += layers * row.get("bf16_gemv_us", 0.0)
            bf16_text = f" | bf16 GEMV {row['bf16_gemv_us']:7.1f}" if "bf16_gemv_us" in row else ""
            print(f"M={m:4d} {name:8s} {kind} {k:5d} x {n:5d}: ours {row['ours_us']:8.1f} "
                  f"({nbytes / 1e3 / row['ours_us']:5.1f}) torch {row['torch_us']:8.1f} "
                  f"({nbytes / 1e3 / row['torch_us']:5.1f}) = {row['torch_us'] / row['ours_us']:5.2f}x{bf16_text}"
                  f" | error {err:.1e}")
            del raws, ours_w, torch_w
        bf16_text = f", bf16 GEMV {total['bf16_us'] / 1e3:.2f} ms" if m == 1 else ""
        print(f"M={m}: a step's linears (30 layers + the LM head): ours {total['ours_us'] / 1e3:.2f} ms, "
              f"torch {total['torch_us'] / 1e3:.2f} ms ({total['torch_us'] / total['ours_us']:.2f}x){bf16_text}")
    write_json(args.output_json, {"benchmark": "cpu_quant_matmul", "args": vars(args), "rows": rows,
                                  "totals": {str(m): t for m, t in totals.items()}})


if __name__ == "__main__":
    main()
