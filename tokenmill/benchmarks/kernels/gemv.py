"""Batch-1 GEMV: the Triton kernel (`ops/gemv.py`) against cuBLAS (`F.linear`).

    python3 -m tokenmill.benchmarks.kernels.gemv [--layers 32] [--output-json gemv.json]

1. Per shape of Llama-3.1-8B (QKV, O, gate/up, down, LM head): the result against `F.linear`
   (relative error) and each one's time and bandwidth (`triton.testing.do_bench`, L2 flushed).
   `--tp N` splits the shapes as tensor parallelism does (one rank's share).
   `--sweep` also times every configuration of a wider grid than the autotuner's on each shape and
   prints the best three beside the autotuner's pick (to choose the tuning space).
   `--graph-sweep` instead times each configuration the way the engine runs it: one CUDA graph of
   back-to-back launches over >= 1 GB of distinct weights (so L2 holds none of them), per
   one-rank shape at `--graph-sweep-tp` sizes (the down projection with its fused SiLU-and-mul),
   beside the autotuner's pick and cuBLAS in the same graph form. Compiles are warmed in parallel
   processes first (a few hundred variants). `--model qwen3-30b-a3b` sweeps that model's dense
   shapes instead (QKV with its input norm fused, O, LM head); `--pdl` launches every GEMV dependent
   (`ops/pdl.py`), as Hopper's decode graphs do; `--write-table` (with `--pdl`) writes the winners
   into `ops/gemv_configs.py`'s dependent-launch table for this GPU, so the engine runs them.
2. The whole decode weight set (`--layers` x the four layer matrices + the LM head, 15.0 GB at 32
   layers) as one CUDA graph of GEMVs, replayed: ms per token for each, as in docs/perf.md.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
import triton.testing

from tokenmill.benchmarks.kernels import table_source
from tokenmill.ops import gemv_configs
from tokenmill.ops.gemv import NormArgs, gemv, plain_launch_args, rms_norm_gemv

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}
# One rank's dense GEMVs of a model at TP=1, as its batch-1 decode graphs run them: name ->
# (N, K, fused SiLU-and-mul, fused input norm). The MoE models' experts are `fused_moe.py`'s.
MODEL_SHAPES = {"qwen3-30b-a3b": {"qkv": (5120, 2048, False, True), "o": (2048, 4096, False, False),
                                  "lm_head": (151936, 2048, False, False)}}
# Where a model's GEMV follows latency-bound kernels in its decode graph: launched dependent, it
# reads its weights while they run, which back-to-back GEMVs cannot show, so it is timed after
# them. name -> (query heads, KV heads, context) of the attention block before it
# (`batch1_attention.block_calls`: QKV GEMV, rope + KV write, paged decode); Qwen3-30B-A3B's
# 512/256 decode attends 512-768 tokens.
MODEL_CONTEXT = {"qwen3-30b-a3b": {"o": (32, 4, 640)}}


def graph_ms(fn, weights, xs, before: list | None = None) -> float:
    """One CUDA graph that runs `fn` over every weight (each after `before`'s call of its index,
    where given); best replay time of 20."""
    def run_all():
        for i, (w, x) in enumerate(zip(weights, xs)):
            if before is not None:
                before[i]()
            fn(x, w)

    run_all()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run_all()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return min(times)


def sweep(x: torch.Tensor, w: torch.Tensor) -> list[dict]:
    """Every configuration of a grid wider than the autotuner's, timed on one shape; best first."""
    from tokenmill.ops.gemv import _gemv_kernel

    n, k = w.shape
    y = torch.empty(1, n, dtype=w.dtype, device=w.device)
    rest, flags = plain_launch_args(y)
    rows = []
    for bn in (2, 4, 8, 16):
        for bk in (256, 512, 1024):
            for warps in (4, 8):
                for stages in (1, 3):
                    def run(bn=bn, bk=bk, warps=warps, stages=stages):
                        _gemv_kernel.fn[(triton.cdiv(n, bn),)](x, w, y, n, k, w.stride(0), *rest, SILU_MUL=False,
                                                               **flags, BLOCK_N=bn, BLOCK_K=bk,
                                                               num_warps=warps, num_stages=stages)
                    us = triton.testing.do_bench(run) * 1e3
                    rows.append({"block_n": bn, "block_k": bk, "warps": warps, "stages": stages, "us": us,
                                 "tb_s": n * k * w.element_size() / us / 1e6})
    rows.sort(key=lambda r: r["us"])
    picked = getattr(_gemv_kernel, "best_config", None)
    print("    sweep best: " + "; ".join(f"{r['block_n']}x{r['block_k']} w{r['warps']} s{r['stages']} "
                                          f"{r['us']:.1f} us {r['tb_s']:.2f} TB/s" for r in rows[:3])
          + f" (autotuner's last pick: {picked})")
    return rows[:10]


GRAPH_SWEEP_GRID = [(bn, bk, w, s) for bn in (1, 2, 4, 8, 16) for bk in (128, 256, 512, 1024)
                    for w in (1, 2, 4, 8) for s in (1, 2, 3, 4) if 512 <= bn * bk <= 8192 and w * 32 <= bk]


def _norm_args(x: torch.Tensor, hidden: int) -> NormArgs:
    """An input norm with a residual, as a decoder layer's (`rms_norm_gemv`), for x [1, hidden]."""
    weight = torch.rand(hidden, dtype=x.dtype, device=x.device) + 0.5
    return NormArgs(weight, torch.randn_like(x), torch.empty_like(x), x, 1e-6, has_residual=True, write_normed=False)


def _launch_flags(dependent: bool) -> dict:
    from tokenmill.ops.pdl import launch_options
    return dict(PDL=dependent, **launch_options(dependent))


def _warm_compiles(configs: list[tuple], silu_mul: bool, norm_hidden: int = 0, dependent: bool = False) -> None:
    """Compile `configs` of the GEMV kernel into Triton's on-disk cache (one process of a pool); with
    `norm_hidden`, the form with the input norm fused over that many inputs (its block is a constexpr)."""
    from tokenmill.ops.gemv import _gemv_kernel

    k = norm_hidden or 1024
    w = torch.zeros(64, k, dtype=torch.bfloat16, device="cuda")
    x = torch.zeros(1, 2 * k if silu_mul else k, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(1, 64, dtype=torch.bfloat16, device="cuda")
    rest, flags = plain_launch_args(y, _norm_args(x, k) if norm_hidden else None, k)
    for bn, bk, warps, stages in configs:
        _gemv_kernel.fn.warmup(x, w, y, 64, k, k, *rest, SILU_MUL=silu_mul, **flags, BLOCK_N=bn, BLOCK_K=bk,
                               num_warps=warps, num_stages=stages, grid=(1,), **_launch_flags(dependent))


def warm_compiles_in_parallel(variants: list[tuple[bool, int]] = ((False, 0), (True, 0)),
                              dependent: bool = False, processes: int = 14,
                              configs: list[tuple] | None = None) -> None:
    """Every config of `configs` (default GRAPH_SWEEP_GRID) of each (silu_mul, norm_hidden) variant,
    compiled in a process pool."""
    import concurrent.futures
    import multiprocessing

    grid = configs if configs is not None else GRAPH_SWEEP_GRID
    jobs = [(grid[i::processes], silu, norm_hidden, dependent)
            for i in range(processes) for silu, norm_hidden in variants if grid[i::processes]]
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm_compiles, *zip(*jobs)))


def time_configs(label: str, configs: list[tuple], make_launch, per_call_us, first: tuple, ref: torch.Tensor,
                 nbytes: int) -> list[dict]:
    """Each (block_n, block_k, warps, stages) of `configs`, launched by `make_launch(config)` (a
    `launch(x, w)`), checked against `ref` on `first` = (x, w) and timed by `per_call_us(launch)`;
    configurations the device cannot run are skipped. Fastest first, with TB/s of `nbytes` a call."""
    rows = []
    for config in configs:
        bn, bk, warps, stages = config
        launch = make_launch(config)
        try:
            out = launch(*first).float()
            us = per_call_us(launch)
        except Exception as e:  # a config this device cannot run (resources): skip it
            print(f"  {label} {bn}x{bk} w{warps} s{stages}: {type(e).__name__}: {e}"[:200], flush=True)
            continue
        if not torch.allclose(out, ref, rtol=2e-2, atol=2e-2):
            raise AssertionError(f"{label} {bn}x{bk} w{warps} s{stages}: wrong result")
        rows.append({"block_n": bn, "block_k": bk, "warps": warps, "stages": stages, "us": us,
                     "tb_s": nbytes / us / 1e6})
    rows.sort(key=lambda r: r["us"])
    return rows


def describe_best(rows: list[dict], count: int = 4) -> str:
    return "; ".join(f"{r['block_n']}x{r['block_k']} w{r['warps']} s{r['stages']} {r['us']:.2f} us "
                     f"{r['tb_s']:.2f} TB/s" for r in rows[:count])


def graph_sweep(shapes: dict[str, tuple[int, int, bool, bool]], min_bytes: float = 1e9,
                dependent: bool = False, context: dict | None = None) -> dict:
    """Per shape (N, K, silu_mul, fused input norm): every GRAPH_SWEEP_GRID config as a CUDA graph
    of back-to-back GEMVs over distinct weights (us per GEMV, best of 10 replays), plus the engine's
    own choice (table or autotuner) and cuBLAS (after the norm's own kernel, where the norm is
    fused) the same way. `dependent`: every launch dependent on the one before (`ops/pdl.py`).
    A shape in `context` (MODEL_CONTEXT's form) is timed after its attention block instead, each
    GEMV reading that block's output: the graph with the GEMVs less the graph without them."""
    from tokenmill.ops.gemv import _gemv_kernel
    from tokenmill.ops.rms_norm import rms_norm

    result = {}
    for name, (n, k, silu, norm) in shapes.items():
        copies = max(4, int(min_bytes // (n * k * 2)) + 1)
        ws = [torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02 for _ in range(copies)]
        xs = [torch.randn(1, 2 * k if silu else k, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        ys = [torch.empty(1, n, dtype=torch.bfloat16, device="cuda") for _ in range(copies)]
        before, before_ms = None, 0.0
        if context and name in context:
            from tokenmill.benchmarks.kernels.batch1_attention import block_calls
            heads, kv_heads, tokens = context[name]
            assert heads * 128 == k and not silu and not norm
            before, xs, _ = block_calls(heads, kv_heads, tokens, copies, dependent)
            before_ms = graph_ms(lambda x, w: None, ws, xs, before)
        norm_args = _norm_args(xs[0], k) if norm else None
        if norm:
            ref = gemv(rms_norm(xs[0], norm_args.weight, norm_args.eps, norm_args.residual)[0], ws[0]).float()
        else:
            ref = gemv(xs[0], ws[0], silu_mul=silu).float()

        def per_call_us(fn) -> float:
            return (graph_ms(fn, ws, xs, before) - before_ms) * 1e3 / copies

        def make_launch(config):
            bn, bk, warps, stages = config

            def launch(x, w):
                y = ys[0]
                rest, flags = plain_launch_args(y, norm_args, k)
                _gemv_kernel.fn[(triton.cdiv(n, bn),)](x, w, y, n, k, w.stride(0), *rest, SILU_MUL=silu, **flags,
                                                       BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                                                       **_launch_flags(dependent))
                return y
            return launch

        rows = time_configs(name, GRAPH_SWEEP_GRID, make_launch, per_call_us, (xs[0], ws[0]), ref, n * k * 2)
        if norm:
            engine_us = per_call_us(lambda x, w: rms_norm_gemv(x, norm_args.weight, norm_args.eps, w, norm_args.residual,
                                                               pdl=dependent))
            cublas_us = per_call_us(lambda x, w: F.linear(rms_norm(x, norm_args.weight, norm_args.eps,
                                                                   norm_args.residual)[0], w))
        elif silu:
            from tokenmill.ops.activation import silu_and_mul
            engine_us = per_call_us(lambda x, w: gemv(x, w, silu_mul=True, pdl=dependent))
            cublas_us = per_call_us(lambda x, w: F.linear(silu_and_mul(x), w))
        else:
            engine_us = per_call_us(lambda x, w: gemv(x, w, pdl=dependent))
            cublas_us = per_call_us(lambda x, w: F.linear(x, w))
        table = gemv_configs.tuned_config(ws[0], silu, dependent, norm)
        picked = str(tuple(table) if table is not None else getattr(_gemv_kernel, "best_config", None))
        gb = n * k * 2 / 1e9
        after = f"after its attention block ({before_ms * 1e3 / copies:.2f} us)" if before else "back to back"
        result[name] = {"n": n, "k": k, "silu_mul": silu, "norm": norm, "dependent": dependent, "copies": copies,
                        "timed": after,
                        "engine_us": engine_us, "engine_config": picked, "cublas_us": cublas_us, "best": rows[:8],
                        "worst_us": rows[-1]["us"]}
        print(f"{name:14s} {n:6d}x{k:5d}{' +silu' if silu else ''}{' +norm' if norm else ''}"
              f"{' (dependent)' if dependent else ''} {after}: engine's choice {engine_us:6.2f} us "
              f"({gb / engine_us * 1e3:.2f} TB/s; {picked}); cuBLAS {cublas_us:6.2f} us; best: "
              + describe_best(rows), flush=True)
        del ws, xs, ys
        torch.cuda.empty_cache()
    return result


def write_pdl_table(device_name: str, sweep: dict) -> str:
    """Replace this GPU's `gemv_configs.TUNED_PDL` table with the sweep's winners, merged into what
    it lists (other models' shapes stay); each note: us in the graph, the engine's choice's beside."""
    entries = {key: (config, "") for key, config in gemv_configs.TUNED_PDL[device_name].items()}
    for name, row in sweep.items():
        best = row["best"][0]
        config = gemv_configs.GemvConfig(best["block_n"], best["block_k"], best["warps"], best["stages"])
        entries[(row["n"], row["k"], row["silu_mul"], row["norm"])] = (
            config, f"{name}: {best['us']:.2f} us ({row['engine_us']:.2f})")
    return table_source.write_table(gemv_configs, gemv_configs.TUNED_PDL, device_name,
                                    "dict[tuple[int, int, bool, bool], GemvConfig]", entries)


def sweep_shapes(tp: int) -> dict[str, tuple[int, int, bool]]:
    """One rank's GEMV shapes of Llama-3.1-8B at TP=`tp`, as the engine runs them."""
    column_parallel = {"qkv", "gate_up", "lm_head"}  # split along N; the rest along K
    shapes = {}
    for name, (n, k) in SHAPES.items():
        n, k = (n // tp, k) if name in column_parallel else (n, k // tp)
        shapes[f"{name}_tp{tp}"] = (n, k, name == "down", False)
    return shapes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--graph-sweep", action="store_true")
    p.add_argument("--graph-sweep-tp", default="2,1", help="comma-separated TP sizes for --graph-sweep")
    p.add_argument("--model", choices=sorted(MODEL_SHAPES), help="--graph-sweep this model's dense shapes")
    p.add_argument("--shapes", help="with --model: comma-separated names of its shapes to sweep (default: all)")
    p.add_argument("--pdl", action="store_true", help="--graph-sweep launches every GEMV dependent")
    p.add_argument("--write-table", action="store_true",
                   help="with --graph-sweep --pdl: write the winners into ops/gemv_configs.py for this GPU")
    p.add_argument("--output-json")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    if args.graph_sweep:
        import time
        from tokenmill.ops import pdl
        dependent = args.pdl and pdl.supported(dev)
        if args.pdl and not dependent:
            raise SystemExit("--pdl: this GPU does not launch dependent kernels (ops/pdl.py)")
        if args.write_table and not dependent:
            raise SystemExit("--write-table writes the dependent-launch table: add --pdl")
        context = {}
        if args.model:
            names = args.shapes.split(",") if args.shapes else list(MODEL_SHAPES[args.model])
            shape_sets = [{name: MODEL_SHAPES[args.model][name] for name in names}]
            context = MODEL_CONTEXT.get(args.model, {}) if dependent else {}
        else:
            shape_sets = [sweep_shapes(int(t)) for t in args.graph_sweep_tp.split(",")]
        variants = sorted({(silu, k if norm else 0) for shapes in shape_sets for _, k, silu, norm in shapes.values()})
        t0 = time.perf_counter()
        warm_compiles_in_parallel(variants, dependent)
        print(f"{len(GRAPH_SWEEP_GRID)} configs x {len(variants)} compiled in {time.perf_counter() - t0:.0f} s",
              flush=True)
        result = {"device": torch.cuda.get_device_name(), "grid": GRAPH_SWEEP_GRID, "shapes": {}}
        for shapes in shape_sets:
            result["shapes"].update(graph_sweep(shapes, dependent=dependent, context=context))
            if args.write_table:  # now, not at the end: a device call may be cut short
                print(write_pdl_table(result["device"], result["shapes"]), flush=True)
        if args.output_json:
            with open(args.output_json, "w") as f:
                json.dump(result, f, indent=2)
        return
    result = {"device": torch.cuda.get_device_name(), "tp": args.tp, "shapes": {}}
    column_parallel = {"qkv", "gate_up", "lm_head"}  # split along N; the rest along K
    shapes = {name: (n // args.tp, k) if name in column_parallel else (n, k // args.tp)
              for name, (n, k) in SHAPES.items()}
    for name, (n, k) in shapes.items():
        w = torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02
        x = torch.randn(1, k, dtype=torch.bfloat16, device=dev)
        ref = F.linear(x, w).float()
        ours = gemv(x, w).float()
        rel = float((ours - ref).norm() / ref.norm())
        t_cublas = triton.testing.do_bench(lambda: F.linear(x, w))
        t_triton = triton.testing.do_bench(lambda: gemv(x, w))
        gb = n * k * 2 / 1e9
        result["shapes"][name] = {"n": n, "k": k, "rel_err": rel, "cublas_us": t_cublas * 1e3,
                                  "triton_us": t_triton * 1e3, "cublas_tb_s": gb / t_cublas,
                                  "triton_tb_s": gb / t_triton}
        print(f"{name:8s} {n:6d}x{k:5d}: rel err {rel:.1e}; cuBLAS {t_cublas * 1e3:7.1f} us "
              f"({gb / t_cublas:.2f} TB/s), Triton {t_triton * 1e3:7.1f} us ({gb / t_triton:.2f} TB/s)")
        if args.sweep:
            result["shapes"][name]["sweep"] = sweep(x, w)
        del w
    weights, xs = [], []
    for _ in range(args.layers):
        for name in ("qkv", "o", "gate_up", "down"):
            n, k = shapes[name]
            weights.append(torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02)
            xs.append(torch.randn(1, k, dtype=torch.bfloat16, device=dev))
    n, k = shapes["lm_head"]
    weights.append(torch.randn(n, k, dtype=torch.bfloat16, device=dev) * 0.02)
    xs.append(torch.randn(1, k, dtype=torch.bfloat16, device=dev))
    total_gb = sum(w.numel() for w in weights) * 2 / 1e9
    ms_cublas = graph_ms(lambda x, w: F.linear(x, w), weights, xs)
    ms_triton = graph_ms(gemv, weights, xs)
    result["weight_set"] = {"gb": total_gb, "cublas_ms": ms_cublas, "triton_ms": ms_triton,
                            "speedup": ms_cublas / ms_triton}
    print(f"weight set {total_gb:.2f} GB as one graph: cuBLAS {ms_cublas:.3f} ms ({total_gb / ms_cublas:.2f} TB/s), "
          f"Triton {ms_triton:.3f} ms ({total_gb / ms_triton:.2f} TB/s): {ms_cublas / ms_triton:.3f}x")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
