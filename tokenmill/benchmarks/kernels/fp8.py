"""fp8 linear kernels against cuBLAS, on Llama-3.1-8B's matrices (one H100/H200).

    python3 -m tokenmill.benchmarks.kernels.fp8 [gemm] [gemv] [--sweep] [--output-json fp8.json]

gemm: prefill shapes (M tokens x each weight), TFLOP/s of
  - `bf16`: cuBLAS `F.linear` on bf16 weights (what an unquantised model runs),
  - `scaled_mm`: cuBLAS's fp8 GEMM (`torch._scaled_mm`, per-tensor scales): the fp8 peak to beat,
  - `scaled_mm_rowwise`: the same with per-token x per-channel scales (what online fp8 computes),
  - `block_gemm`: ours with 128x128 block scales (`ops/fp8_gemm.fp8_gemm`, activations already
    quantised), and `block_linear`: with the activation quantisation pass (`fp8_linear`),
  - `block_linear_cublas`: the same product through cuBLAS's block-scaled GEMM (`fp8_linear` with
    `cublas_min_rows=1`; its largest difference from `block_linear`, relative to the largest
    output, in `cublas_rel_err`): where it beats `block_linear` sets `fp8_gemm.CUBLAS_MIN_ROWS`,
  - `channel_linear`: ours with channel scales, quantisation pass included, and
    `channel_linear_cublas`: the same through cuBLAS's row-wise scaled GEMM.
  `--sweep` also times other tile configurations of the block GEMM per shape (best three printed).
gemv: batch-1 decode over the whole weight set (`--layers` x QKV, O, gate/up, down with its fused
  SiLU-and-mul), each as one CUDA graph: the bf16 Triton GEMV against the fp8 one (block scales and
  channel scales); ms per token and GB/s of weights read, beside the device's copy rate measured in
  the same run.
gemv-sweep: every launch configuration of `GEMV_SWEEP_GRID` of the fp8 GEMV, per Llama-3.1-8B matrix
  (`--sweep-tp` sizes) and scale form, timed as the engine runs it: one CUDA graph of back-to-back
  GEMVs over >= 1 GB of distinct weights (none served from L2); best four printed beside the
  autotuner's pick in the same graph form. What `ops/gemv_configs.TUNED_FP8` lists comes from here;
  `--pdl` launches them dependent (`TUNED_FP8_PDL`), `--write-table` writes the winners into this
  GPU's table of `ops/gemv_configs.py`.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
import torch.nn.functional as F
import triton
import triton.testing

from tokenmill.benchmarks.kernels import table_source
from tokenmill.benchmarks.kernels.copy_bandwidth import copy_rate
from tokenmill.benchmarks.kernels.gemv import SHAPES, graph_ms
from tokenmill.ops import gemv_configs, pdl
from tokenmill.ops.fp8_format import quantize_weight_blocks, quantize_weight_per_channel
from tokenmill.ops.fp8_gemm import GemmConfig, fp8_gemm, fp8_linear, gemm_config
from tokenmill.ops.fp8_gemv import fp8_gemv
from tokenmill.ops.fp8_quant import per_token_group_quant
from tokenmill.ops.gemv import gemv

BLOCK = (128, 128)
GEMV_CONFIGS_PY = pathlib.Path(gemv_configs.__file__)
PREFILL_SHAPES = {name: SHAPES[name] for name in ("qkv", "o", "gate_up", "down")}
SWEEP = [GemmConfig(bm, bn, 8, w, s) for bm in (64, 128) for bn in (64, 128, 256) for w in (4, 8) for s in (3, 4)
         if not (bm == 128 and bn == 256 and s == 4)]


def _tflops(m: int, n: int, k: int, ms: float) -> float:
    return 2 * m * n * k / ms / 1e9


def bench_gemm(ms_list: list[int], sweep: bool, graphs: bool = False) -> list[dict]:
    rows = []
    timer = triton.testing.do_bench_cudagraph if graphs else triton.testing.do_bench
    for m in ms_list:
        for name, (n, k) in PREFILL_SHAPES.items():
            torch.manual_seed(0)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w_blk, s_blk = quantize_weight_blocks(w, BLOCK)
            w_ch, s_ch = quantize_weight_per_channel(w)
            x_q, x_s = per_token_group_quant(x, BLOCK[1])
            x_qt, x_st = per_token_group_quant(x, k)
            one = torch.ones((), device="cuda")
            w_t = w_blk.t()  # column-major, as cuBLAS's fp8 GEMM wants its second operand
            cases = {
                "bf16": lambda: F.linear(x, w),
                "scaled_mm": lambda: torch._scaled_mm(x_q, w_t, scale_a=one, scale_b=one, out_dtype=torch.bfloat16),
                "scaled_mm_rowwise": lambda: torch._scaled_mm(x_qt, w_ch.t(), scale_a=x_st, scale_b=s_ch.view(1, n),
                                                              out_dtype=torch.bfloat16),
                "block_gemm": lambda: fp8_gemm(x_q, x_s, w_blk, s_blk, BLOCK, torch.bfloat16),
                "block_linear": lambda: fp8_linear(x, w_blk, s_blk, BLOCK),
                "block_linear_cublas": lambda: fp8_linear(x, w_blk, s_blk, BLOCK, cublas_min_rows=1),
                "channel_linear": lambda: fp8_linear(x, w_ch, s_ch, None),
                "channel_linear_cublas": lambda: fp8_linear(x, w_ch, s_ch, None, cublas_min_rows=1),
            }
            row = {"m": m, "shape": name, "n": n, "k": k}
            for case, fn in cases.items():
                try:
                    row[case] = _tflops(m, n, k, timer(fn))
                except RuntimeError as exc:  # e.g. a cuBLAS without row-wise fp8 scaling
                    row[case] = None
                    print(f"  {case} failed: {str(exc).splitlines()[0]}")
            row["block_gemm_vs_scaled_mm"] = row["block_gemm"] / row["scaled_mm"] if row["scaled_mm"] else None
            if row["block_linear_cublas"]:
                ours = fp8_linear(x, w_blk, s_blk, BLOCK).float()
                theirs = fp8_linear(x, w_blk, s_blk, BLOCK, cublas_min_rows=1).float()
                row["cublas_rel_err"] = ((theirs - ours).abs().max() / ours.abs().max()).item()
            if sweep:
                timed = []
                for config in SWEEP:
                    ms = triton.testing.do_bench(
                        lambda c=config: fp8_gemm(x_q, x_s, w_blk, s_blk, BLOCK, torch.bfloat16, config=c))
                    timed.append((_tflops(m, n, k, ms), config))
                timed.sort(key=lambda t: -t[0])
                row["sweep_best"] = [{"tflops": t, "config": c._asdict()} for t, c in timed[:3]]
                row["heuristic"] = gemm_config(m, n, k)._asdict()
            rows.append(row)
            fmt = lambda v: f"{v:6.0f}" if v else "   n/a"  # noqa: E731
            print(f"M={m:5d} {name:8s} {n:5d}x{k:5d}: bf16 {fmt(row['bf16'])} | scaled_mm {fmt(row['scaled_mm'])} "
                  f"rowwise {fmt(row['scaled_mm_rowwise'])} | block gemm {fmt(row['block_gemm'])} "
                  f"+quant {fmt(row['block_linear'])} cublas+quant {fmt(row['block_linear_cublas'])} "
                  f"(err {row.get('cublas_rel_err', float('nan')):.1e}) | channel+quant {fmt(row['channel_linear'])} "
                  f"cublas {fmt(row['channel_linear_cublas'])} TFLOP/s"
                  + (f" | sweep best {timed[0][0]:.0f} {tuple(timed[0][1])}" if sweep else ""))
            del w, w_blk, w_ch, w_t
            torch.cuda.empty_cache()
    return rows


def bench_gemv(layers: int) -> dict:
    """ms per decode token over the layer weight set, each kernel in one CUDA graph."""
    shapes = [PREFILL_SHAPES[name] for name in ("qkv", "o", "gate_up", "down")]
    silu = [False, False, False, True]
    torch.manual_seed(0)
    bf16, blocks, channels, xs = [], [], [], []
    for _ in range(layers):
        for (n, k), fused in zip(shapes, silu):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            bf16.append(w)
            blocks.append(quantize_weight_blocks(w, BLOCK))
            channels.append(quantize_weight_per_channel(w))
            # (input row, whether it is the down projection's [gate | up] with the fused SiLU-and-mul)
            xs.append((torch.randn(1, 2 * k if fused else k, device="cuda", dtype=torch.bfloat16), fused))
    result = {"layers": layers, "copy_gb_per_s": copy_rate(torch.cuda.current_device(), 4.0)}
    # Each also launched dependent on the GEMV before it (`_pdl`, ops/pdl.py), as the engine does on Hopper.
    runs = {}
    for suffix, dependent in [("", False)] + ([("_pdl", True)] if pdl.supported(torch.device("cuda")) else []):
        runs.update({
            f"bf16_gemv{suffix}": (bf16, lambda x, w, p=dependent: gemv(x[0], w, silu_mul=x[1], pdl=p)),
            f"fp8_block_gemv{suffix}": (
                blocks, lambda x, w, p=dependent: fp8_gemv(x[0], w[0], w[1], BLOCK, silu_mul=x[1], pdl=p)),
            f"fp8_channel_gemv{suffix}": (
                channels, lambda x, w, p=dependent: fp8_gemv(x[0], w[0], w[1], None, silu_mul=x[1], pdl=p)),
        })
    for name, (weights, fn) in runs.items():
        nbytes = sum(w.numel() * w.element_size() if isinstance(w, torch.Tensor)
                     else w[0].numel() + w[1].numel() * 4 for w in weights)
        ms = graph_ms(fn, weights, xs)
        result[name] = {"ms": ms, "gb": nbytes / 1e9, "gb_per_s": nbytes / ms / 1e6}
        print(f"{name:17s}: {ms:7.3f} ms for {nbytes / 1e9:5.2f} GB = {nbytes / ms / 1e6:6.0f} GB/s "
              f"({nbytes / ms / 1e6 / result['copy_gb_per_s'] * 100:.0f}% of the copy rate "
              f"{result['copy_gb_per_s']:.0f} GB/s)")
    result["fp8_block_vs_bf16_time"] = result["fp8_block_gemv"]["ms"] / result["bf16_gemv"]["ms"]
    result["fp8_channel_vs_bf16_time"] = result["fp8_channel_gemv"]["ms"] / result["bf16_gemv"]["ms"]
    print(f"fp8 GEMV time / bf16 GEMV time: block {result['fp8_block_vs_bf16_time']:.2f}x, "
          f"channel {result['fp8_channel_vs_bf16_time']:.2f}x")
    if "bf16_gemv_pdl" in result:
        print("dependent launches / ordinary: " + ", ".join(
            f"{name} {result[name + '_pdl']['ms'] / result[name]['ms']:.3f}x"
            for name in ("bf16_gemv", "fp8_block_gemv", "fp8_channel_gemv")))
    return result


# (BLOCK_N, BLOCK_K, warps, stages): tiles of 2-32 KB of e4m3 weights, each thread at least 16 bytes.
GEMV_SWEEP_GRID = [(bn, bk, w, s) for bn in (2, 4, 8, 16, 32) for bk in (256, 512, 1024, 2048)
                   for w in (1, 2, 4, 8) for s in (1, 2, 3) if 2048 <= bn * bk <= 32768 and w * 32 * 16 <= bn * bk]


def _warm_gemv_compiles(configs: list[tuple], blockwise: bool, silu_mul: bool, dependent: bool) -> None:
    """Compile `configs` of the fp8 GEMV into Triton's on-disk cache (one process of a pool), with
    arguments that specialise as the Llama shapes do (every size and stride a multiple of 16)."""
    from tokenmill.ops.fp8_gemv import _fp8_gemv_kernel

    n, k = 256, 2048
    w = torch.zeros(n, k, device="cuda").to(torch.float8_e4m3fn)
    s = torch.ones(n // 128, k // 128, device="cuda") if blockwise else torch.ones(n, device="cuda")
    x = torch.zeros(1, 2 * k if silu_mul else k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(1, n, dtype=torch.bfloat16, device="cuda")
    for bn, bk, warps, stages in configs:
        _fp8_gemv_kernel.warmup(x, w, s, y, n, k, k, k // 128 if blockwise else 0, BLOCKWISE=blockwise,
                                SCALE_BLOCK_N=128 if blockwise else 1, SCALE_BLOCK_K=128 if blockwise else 1,
                                SILU_MUL=silu_mul, PDL=dependent, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                                num_stages=stages, grid=(1,))


def _warm_gemv_sweep(grid: list[tuple], dependent: bool, processes: int = 14) -> None:
    import concurrent.futures
    import multiprocessing

    jobs = [(grid[i::processes], blockwise, silu, dependent) for i in range(processes)
            for blockwise in (True, False) for silu in (False, True)]
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm_gemv_compiles, *zip(*jobs)))


def grid_from(path: str, top: int) -> list[tuple]:
    """The configurations among the `top` fastest of any shape in an earlier sweep's JSON (a
    narrower grid, for a sweep of another launch form where most of the grid cannot win)."""
    sweep = json.loads(pathlib.Path(path).read_text())["gemv_sweep"]
    return sorted({(r["block_n"], r["block_k"], r["warps"], r["stages"]) for row in sweep.values()
                   for r in row["best"][:top]})


def gemv_sweep(tps: list[int], dependent: bool = False, grid: list[tuple] = GEMV_SWEEP_GRID,
               min_bytes: float = 1e9) -> dict:
    """Per one-rank Llama-3.1-8B shape and scale form: every GEMV_SWEEP_GRID configuration as a CUDA
    graph of back-to-back fp8 GEMVs over distinct weights (us per GEMV), and the engine's pick
    (the table's, else the autotuner's). `dependent`: every GEMV launched dependent (ops/pdl.py)."""
    import time

    from tokenmill.benchmarks.kernels.gemv import describe_best, sweep_shapes, time_configs
    from tokenmill.ops.activation import silu_and_mul
    from tokenmill.ops.fp8_gemv import GemvConfig, _fp8_gemv_tuned, fp8_gemv, fp8_gemv_ref
    from tokenmill.ops.gemv_configs import tuned_fp8_config

    t0 = time.perf_counter()
    _warm_gemv_sweep(grid, dependent)
    print(f"{len(grid)} configs x 4 compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    result = {}
    for tp in tps:
        shapes = {name: v for name, v in sweep_shapes(tp).items() if not name.startswith("lm_head")}
        for name, (n, k, silu) in shapes.items():
            copies = max(4, int(min_bytes // (n * k)) + 1)
            w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
            for form, block in (("block", BLOCK), ("channel", None)):
                w_q, w_s = quantize_weight_blocks(w, BLOCK) if block else quantize_weight_per_channel(w)
                ws = [(w_q.clone(), w_s.clone()) for _ in range(copies)]
                xs = [torch.randn(1, 2 * k if silu else k, dtype=torch.bfloat16, device="cuda")
                      for _ in range(copies)]
                ref = fp8_gemv_ref(silu_and_mul(xs[0]) if silu else xs[0], w_q, w_s, block).float()

                def per_call_us(fn) -> float:
                    return graph_ms(fn, ws, xs) * 1e3 / copies

                fitting = [c for c in grid if block is None or block[0] % c[0] == 0]

                def make_launch(config, block=block):
                    config = GemvConfig(*config)
                    return lambda x, wt: fp8_gemv(x, wt[0], wt[1], block, silu_mul=silu, config=config,
                                                  pdl=dependent)

                rows = time_configs(f"{name} {form}", fitting, make_launch, per_call_us, (xs[0], ws[0]), ref, n * k)
                tuned_us = per_call_us(lambda x, wt: fp8_gemv(x, wt[0], wt[1], block, silu_mul=silu, pdl=dependent))
                picked = str(tuned_fp8_config(ws[0][0], silu, block is not None, dependent)
                             or getattr(_fp8_gemv_tuned, "best_config", None))
                result[f"{name}_{form}"] = {"n": n, "k": k, "silu_mul": silu, "form": form, "copies": copies,
                                            "dependent": dependent,
                                            "default_us": tuned_us, "default_config": picked, "best": rows[:8],
                                            "worst_us": rows[-1]["us"]}
                print(f"{name:12s} {form:7s} {n:6d}x{k:5d}{' +silu' if silu else '      '}: default {tuned_us:6.2f} us "
                      f"({n * k / tuned_us / 1e6:.2f} TB/s; {picked}); best: "
                      + describe_best(rows), flush=True)
                del ws, xs
            del w
            torch.cuda.empty_cache()
    return result


def table_variable(device_name: str, dependent: bool) -> str:
    """The name of `ops/gemv_configs.py`'s fp8 table for this GPU and launch form."""
    tables = gemv_configs.TUNED_FP8_PDL if dependent else gemv_configs.TUNED_FP8
    return table_source.table_variable(gemv_configs, tables, device_name)


def write_table(sweep: dict, variable: str, path: pathlib.Path = GEMV_CONFIGS_PY) -> str:
    """Replace `variable = {...}` in `ops/gemv_configs.py` with each swept shape's fastest configuration
    (the measured table the engine then uses); returns the new table's source."""
    lines = [f"{variable}: dict[tuple[int, int, bool, str], GemvConfig] = {{"]
    for row in sweep.values():
        best = row["best"][0]
        config = f"GemvConfig({best['block_n']}, {best['block_k']}, {best['warps']}, {best['stages']})"
        lines.append(f"    ({row['n']}, {row['k']}, {row['silu_mul']}, \"{row['form']}\"): {config},  "
                     f"# {best['us']:.2f} us (before: {row['default_us']:.2f})")
    table = "\n".join(lines + ["}"])
    table_source.replace_table(path, variable, table)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["gemm", "gemv"], choices=["gemm", "gemv", "gemv-sweep"])
    parser.add_argument("--m", type=int, nargs="+", default=[512, 2048, 8192], help="prefill token counts")
    parser.add_argument("--sweep", action="store_true", help="also time other block-GEMM tile configurations")
    parser.add_argument("--graphs", action="store_true",
                        help="time each GEMM case as CUDA-graph replays (the GPU's time without the host's "
                             "launch cost, which bounds small token counts otherwise)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers in the GEMV weight set")
    parser.add_argument("--sweep-tp", type=int, nargs="+", default=[1], help="TP sizes for gemv-sweep's shapes")
    parser.add_argument("--pdl", action="store_true", help="gemv-sweep launches every GEMV dependent (ops/pdl.py)")
    parser.add_argument("--grid-from", metavar="JSON",
                        help="gemv-sweep times only the configurations among the --grid-top fastest of any "
                             "shape in this earlier sweep's output")
    parser.add_argument("--grid-top", type=int, default=6)
    parser.add_argument("--write-table", action="store_true",
                        help="gemv-sweep writes its winners into ops/gemv_configs.py's table for this GPU "
                             "(TUNED_FP8, or TUNED_FP8_PDL with --pdl), for the engine to use")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name()}")
    result = {"device": torch.cuda.get_device_name()}
    if "gemm" in args.parts:
        result["gemm"] = bench_gemm(args.m, args.sweep, args.graphs)
    if "gemv" in args.parts:
        result["gemv"] = bench_gemv(args.layers)
    if "gemv-sweep" in args.parts:
        result["gemv_copy_gb_per_s"] = copy_rate(torch.cuda.current_device(), 4.0)
        print(f"copy rate: {result['gemv_copy_gb_per_s']:.0f} GB/s")
        variable = table_variable(result["device"], args.pdl) if args.write_table else None  # before, not after, the sweep
        grid = grid_from(args.grid_from, args.grid_top) if args.grid_from else GEMV_SWEEP_GRID
        result["gemv_sweep"] = gemv_sweep(args.sweep_tp, args.pdl, grid)
        if variable:
            print(write_table(result["gemv_sweep"], variable))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
