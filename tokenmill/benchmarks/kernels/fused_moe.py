"""The fused MoE kernels (`ops/fused_moe.py`) against the device's own limits, measured in the same run.

    python3 -m tokenmill.benchmarks.kernels.fused_moe [--shapes qwen3-30b-a3b,mixtral-8x7b,minimax-m2]
        [--sweep [--sweep-shapes qwen3-30b-a3b]] [--output-json moe.json] [--tuned-out fused_moe_tuned.py]
        [--gemv-sweep [--write-table]] [--router-sweep [--write-table]]

For each model's expert shape (one layer's routed experts at TP=1), at decode token counts the
achieved bandwidth (bytes of the experts actually chosen + activations, over the time) beside the
device copy rate, and at prefill token counts the achieved TFLOP/s beside the bf16 matmul peak
(a large cuBLAS GEMM). Routing is uniform random, like dummy weights give. Every time is a CUDA
graph of back-to-back calls over several layers' weights (more bytes than L2 holds), as the
engine's decode graphs run them; the best of several replays.

`--sweep` times every candidate launch configuration at each token count and shape, prints the
best beside the heuristic's, and writes the winners as `ops/fused_moe_configs.TUNED` entries
(`--tuned-out`) to paste into that file. `--gemv-sweep` times the token-by-token path's tile sizes
and warps (`MoeGemvConfig`) at one token, the gate/up kernel's first (with the default down), then
the down kernel's (after the best gate/up); `--write-table` writes the winners into
`ops/fused_moe_configs.py`'s table for this GPU, so the engine runs them. The kernels launch as the
engine launches them: dependent (`ops/pdl.py`) where the GPU supports it.

`--router-sweep` times the one-launch router with its input norm (`moe_routing.
rms_norm_route_from_hidden`, batch-1 decode's) at each `RouterConfig` of `ROUTER_SPACE`: its cost
a layer is a graph of [O-projection-sized GEMV, router] layers (distinct weights each, more than L2
holds) minus the same graph without the routers, so the GEMV's tail and the router's start
overlap as in the engine. `--write-table` writes the winners into the router's table for this GPU.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from tokenmill.benchmarks.kernels import table_source
from tokenmill.benchmarks.kernels.copy_bandwidth import copy_rate
from tokenmill.ops import fused_moe_configs, pdl
from tokenmill.ops.fused_moe import fused_experts
from tokenmill.ops.fused_moe_configs import (DEFAULT_GEMV, GEMV_MAX_TOKENS, MoeGemvConfig, MoeKernelConfig,
                                             RouterConfig, default_config, default_router_config)
from tokenmill.ops.fused_moe_gemv import fused_experts_gemv
from tokenmill.ops.gemv import gemv
from tokenmill.ops.moe_routing import new_router_counter, rms_norm_route_from_hidden

# name: (experts, hidden, intermediate, top_k), one layer at TP=1 (the shipped shapes' values)
SHAPES = {"qwen3-30b-a3b": (128, 2048, 768, 8), "mixtral-8x7b": (8, 4096, 14336, 2),
          "minimax-m2": (256, 3072, 1536, 8)}
DECODE_TOKENS = (1, 2, 4, 8, 16, 64, 128)
PREFILL_TOKENS = (512, 2048, 8192)
LAYERS_BYTES = 16 << 30  # several layers' experts per shape, cycled so that L2 (tens of MB) holds none


def matmul_peak_tflops(dtype=torch.bfloat16, n: int = 8192) -> float:
    a = torch.randn(n, n, dtype=dtype, device="cuda")
    b = torch.randn(n, n, dtype=dtype, device="cuda")
    return 2 * n ** 3 / graph_seconds([lambda: torch.matmul(a, b)]) / 1e12


def graph_seconds(calls: list, replays: int = 10) -> float:
    """Best replay time of one CUDA graph running every call once, in seconds."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    best = float("inf")
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1000)
    return best


class Layers:
    """`count` layers' expert weights of one shape (distinct memory each), and one step's inputs."""

    def __init__(self, experts: int, hidden: int, inter: int, top_k: int, count: int, dtype=torch.bfloat16):
        self.top_k, self.experts, self.hidden = top_k, experts, hidden
        scale = 0.02
        self.w13 = [torch.randn(experts, 2 * inter, hidden, dtype=dtype, device="cuda") * scale for _ in range(count)]
        self.w2 = [torch.randn(experts, hidden, inter, dtype=dtype, device="cuda") * scale for _ in range(count)]
        self.expert_bytes = 3 * hidden * inter * torch.empty((), dtype=dtype).element_size()
        self.dtype = dtype

    def inputs(self, tokens: int, seed: int):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x = torch.randn(tokens, self.hidden, dtype=self.dtype, device="cuda", generator=g)
        scores = torch.rand(tokens, self.experts, device="cuda", generator=g)
        weights, ids = scores.topk(self.top_k, dim=-1)
        return x, weights.float().contiguous(), ids.to(torch.int32).contiguous()

    def time(self, tokens: int, config: MoeKernelConfig | None = None, path: str = "auto",
             gemv_config: MoeGemvConfig | None = None) -> tuple[float, int]:
        """Seconds per layer call, and the distinct experts one call reads (averaged over layers).
        `gemv_config`: the token-by-token path with that configuration."""
        inputs = [self.inputs(tokens, seed) for seed in range(len(self.w13))]
        dependent = pdl.supported(self.w13[0].device)
        experts = (functools.partial(fused_experts_gemv, config=gemv_config) if gemv_config is not None
                   else functools.partial(fused_experts, config=config, path=path))
        calls = [lambda w13=w13, w2=w2, inp=inp: experts(inp[0], w13, w2, inp[1], inp[2], pdl=dependent)
                 for w13, w2, inp in zip(self.w13, self.w2, inputs)]
        seconds = graph_seconds(calls) / len(calls)
        distinct = sum(torch.unique(inp[2]).numel() for inp in inputs) / len(inputs)
        return seconds, distinct


def layers_for(shape: tuple[int, int, int, int]) -> Layers:
    experts, hidden, inter, top_k = shape
    layer_bytes = 3 * experts * hidden * inter * 2
    return Layers(experts, hidden, inter, top_k, count=max(2, min(8, LAYERS_BYTES // layer_bytes)))


def measure_shape(name: str, layers: Layers, copy_gb_s: float, peak_tflops: float) -> list[dict]:
    rows = []
    inter = layers.w2[0].shape[2]
    for tokens in DECODE_TOKENS + PREFILL_TOKENS:
        seconds, distinct = layers.time(tokens)
        bytes_read = distinct * layers.expert_bytes + 2 * tokens * layers.hidden * 2 * (1 + layers.top_k)
        flops = 2 * tokens * layers.top_k * 3 * layers.hidden * inter
        row = {"shape": name, "tokens": tokens, "us": seconds * 1e6, "experts_read": distinct,
               "tb_s": bytes_read / seconds / 1e12, "tflops": flops / seconds / 1e12,
               "config": list(default_config(tokens, layers.experts, layers.top_k, 2))}
        row["of_copy_rate"] = row["tb_s"] * 1e3 / copy_gb_s
        row["of_matmul_peak"] = row["tflops"] / peak_tflops
        rows.append(row)
        kind = "decode " if tokens in DECODE_TOKENS else "prefill"
        row["path"] = "gemv" if tokens <= GEMV_MAX_TOKENS else "grouped"
        print(f"  {name:14s} {kind} T={tokens:5d}: {row['us']:8.1f} us  {row['tb_s']:5.2f} TB/s "
              f"({row['of_copy_rate']:4.0%} of copy)  {row['tflops']:6.1f} TFLOP/s "
              f"({row['of_matmul_peak']:4.0%} of peak)  experts read {distinct:.0f}  [{row['path']}]")
        if tokens <= 2 * GEMV_MAX_TOKENS:  # where the two paths cross: both, for GEMV_MAX_TOKENS
            other = "grouped" if row["path"] == "gemv" else "gemv"
            row[f"us_{other}"] = layers.time(tokens, path=other)[0] * 1e6
            print(f"  {'':14s}         T={tokens:5d}: {row[f'us_{other}']:8.1f} us  [{other}]")
    return rows


# (block_n, block_k, warps, stages) tried at each row-block size: a small space, so the sweep's
# compiles (two kernels per configuration) stay within a couple of minutes.
_FEW_ROWS = ((32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (64, 256, 4, 2), (128, 64, 4, 3),
             (128, 128, 4, 3), (32, 256, 4, 3), (64, 128, 8, 3))
_MANY_ROWS = ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4), (256, 64, 8, 3), (128, 128, 8, 3))


def candidate_configs(tokens: int) -> list[MoeKernelConfig]:
    """The sweep's space at a token count: short row blocks for decode, large tiles for prefill."""
    if tokens <= 16:
        shapes = [(16, t) for t in _FEW_ROWS]
    elif tokens <= 128:
        shapes = [(bm, t) for bm in (16, 32) for t in _FEW_ROWS]
    else:
        shapes = [(bm, t) for bm in (64, 128) for t in _MANY_ROWS]
    return [MoeKernelConfig(bm, bn, bk, 1 if bm == 16 else 8, warps, stages) for bm, (bn, bk, warps, stages) in shapes]


def sweep_shape(name: str, layers: Layers) -> dict[int, MoeKernelConfig]:
    inter = layers.w2[0].shape[2]
    best_by_tokens = {}
    for tokens in DECODE_TOKENS + PREFILL_TOKENS:
        timed = []
        for config in candidate_configs(tokens):
            try:
                timed.append((layers.time(tokens, config, path="grouped")[0], config))
            except Exception as exc:  # noqa: BLE001 - a config past the device's limits: skip it
                print(f"    skip {config}: {type(exc).__name__}")
        timed.sort(key=lambda t: t[0])
        heuristic = layers.time(tokens, path="grouped")[0]
        best_by_tokens[tokens] = timed[0][1]
        print(f"  sweep {name} T={tokens}: best {timed[0][0] * 1e6:.1f} us {tuple(timed[0][1])}, "
              f"heuristic {heuristic * 1e6:.1f} us ({heuristic / timed[0][0]:.2f}x the best)")
    key = (layers.experts, layers.hidden, inter, 2)
    return {key: best_by_tokens}


# The token-by-token path's space: (block_n, block_k, warps) of gate/up; (rows, block_k, warps) of down.
GATE_UP_SPACE = [(bn, bk, w) for bn in (8, 16, 32) for bk in (128, 256, 512) for w in (4, 8)]
DOWN_SPACE = [(rows, bk, w) for rows in (16, 32, 64) for bk in (64, 128, 256) for w in (4, 8)]


def gemv_sweep_shape(name: str, layers: Layers, tokens: int = 1) -> tuple[tuple, MoeGemvConfig, dict]:
    """The fastest `MoeGemvConfig` at `tokens` (gate/up swept with the default down, then down
    with the best gate/up): (table key, config, timings in us)."""
    def timed(config: MoeGemvConfig) -> float:
        try:
            return layers.time(tokens, gemv_config=config)[0] * 1e6
        except Exception as exc:  # noqa: BLE001 - a config past the device's limits: skip it
            print(f"    skip {tuple(config)}: {type(exc).__name__}")
            return float("inf")

    default_us = timed(DEFAULT_GEMV)
    gate_up = min(((timed(DEFAULT_GEMV._replace(gate_up_block_n=bn, gate_up_block_k=bk, gate_up_warps=w)), (bn, bk, w))
                   for bn, bk, w in GATE_UP_SPACE), key=lambda t: t[0])
    best = DEFAULT_GEMV._replace(gate_up_block_n=gate_up[1][0], gate_up_block_k=gate_up[1][1],
                                 gate_up_warps=gate_up[1][2])
    down = min(((timed(best._replace(down_rows=rows, down_block_k=bk, down_warps=w)), (rows, bk, w))
                for rows, bk, w in DOWN_SPACE), key=lambda t: t[0])
    best = best._replace(down_rows=down[1][0], down_block_k=down[1][1], down_warps=down[1][2])
    best_us = down[0]  # the down space holds the default down, so this is at most gate/up's best
    print(f"  gemv sweep {name} T={tokens}: default {tuple(DEFAULT_GEMV)} {default_us:.1f} us; "
          f"best {tuple(best)} {best_us:.1f} us ({default_us / best_us:.2f}x)", flush=True)
    key = (layers.experts, layers.hidden, layers.w2[0].shape[2], layers.dtype.itemsize, layers.top_k)
    return key, best, {"default_us": default_us, "best_us": best_us}


def write_table(tables: dict, annotation: str, device_name: str, winners: dict) -> str:
    """Replace this GPU's table among `fused_moe_configs`' `tables` with `winners`
    ({key: (config, {"best_us", "default_us"})}), entries typed `annotation`."""
    entries = {key: (config, f"{us['best_us']:.2f} us (default {us['default_us']:.2f})")
               for key, (config, us) in winners.items()}
    return table_source.write_table(fused_moe_configs, tables, device_name, annotation, entries)


ROUTER_SPACE = [RouterConfig(bn, bk, w) for bn in (1, 2, 4) for bk in (512, 1024, 2048) for w in (1, 2, 4)]


class RouterLayers:
    """`count` layers of [GEMV of an O projection's size (hidden x 2 hidden), norm + router] at one
    token, distinct weights each; `cost_us(config)` is the routers' share of the graph a layer."""

    def __init__(self, experts: int, hidden: int, top_k: int, count: int = 64, dtype=torch.bfloat16):
        self.experts, self.hidden, self.top_k, self.dtype = experts, hidden, top_k, dtype
        self.o = [torch.randn(hidden, 2 * hidden, dtype=dtype, device="cuda") * 0.02 for _ in range(count)]
        self.gate = [torch.randn(experts, hidden, dtype=dtype, device="cuda") * 0.02 for _ in range(count)]
        self.attn = [torch.randn(1, 2 * hidden, dtype=dtype, device="cuda") for _ in range(count)]
        self.residual = [torch.randn(1, hidden, dtype=dtype, device="cuda") for _ in range(count)]
        self.norm_weight = torch.rand(hidden, dtype=dtype, device="cuda") + 0.5
        self.counter = new_router_counter(torch.device("cuda"))
        self.dependent = pdl.supported(torch.device("cuda"))
        self._gemvs_alone: float | None = None

    def route(self, layer: int, config: RouterConfig | None, out: torch.Tensor | None = None):
        o = gemv(self.attn[layer], self.o[layer], pdl=self.dependent) if out is None else out
        return rms_norm_route_from_hidden(o, self.residual[layer], self.norm_weight, 1e-6, self.gate[layer], self.top_k,
                                          False, True, 1.0, None, self.counter, self.dependent, config)

    def cost_us(self, config: RouterConfig | None) -> float:
        layers = range(len(self.o))
        with_router = graph_seconds([lambda i=i: self.route(i, config) for i in layers])
        return (with_router - self.gemvs_alone()) / len(self.o) * 1e6

    def gemvs_alone(self) -> float:
        if self._gemvs_alone is None:
            self._gemvs_alone = graph_seconds([lambda i=i: gemv(self.attn[i], self.o[i], pdl=self.dependent)
                                               for i in range(len(self.o))])
        return self._gemvs_alone


def _warm_router(configs: list[RouterConfig], experts: int, hidden: int, top_k: int) -> None:
    """Compile `configs` of the norm-fused router into Triton's on-disk cache (one process of a pool)."""
    layers = RouterLayers(experts, hidden, top_k, count=1)
    out = torch.randn(1, hidden, dtype=layers.dtype, device="cuda")
    for config in configs:
        layers.route(0, config, out)
    torch.cuda.synchronize()


def router_sweep_shape(name: str, shape: tuple[int, int, int, int], processes: int = 14) -> tuple[tuple, RouterConfig, dict]:
    """The fastest `RouterConfig` of `ROUTER_SPACE` for this shape: (table key, config, timings in us).
    Each is checked first against the default: the same normalised row, experts and weights."""
    import concurrent.futures
    import multiprocessing

    experts, hidden, _, top_k = shape
    jobs = [ROUTER_SPACE[i::processes] for i in range(processes)]
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_warm_router, jobs, *zip(*[(experts, hidden, top_k)] * processes)))
    layers = RouterLayers(experts, hidden, top_k)
    out = torch.randn(1, hidden, dtype=layers.dtype, device="cuda")
    default = default_router_config(experts, hidden)
    ref_weights, ref_ids, ref_normed, _ = layers.route(0, default, out)
    timings = {}
    for config in ROUTER_SPACE:
        weights, ids, normed, _ = layers.route(0, config, out)
        assert torch.equal(normed, ref_normed), f"router {tuple(config)}: the normalised row differs"
        same = torch.equal(ids.sort().values, ref_ids.sort().values) and torch.allclose(
            weights.sort().values, ref_weights.sort().values, atol=1e-2)
        assert same, f"router {tuple(config)}: {ids.tolist()} {weights.tolist()}, default {ref_ids.tolist()} {ref_weights.tolist()}"
        timings[config] = layers.cost_us(config)
        print(f"    router {tuple(config)}: {timings[config]:.2f} us", flush=True)
    best = min(timings, key=timings.get)
    default_us = timings[default] if default in timings else layers.cost_us(default)
    print(f"  router sweep {name}: default {tuple(default)} {default_us:.2f} us a layer; best {tuple(best)} "
          f"{timings[best]:.2f} us ({default_us - timings[best]:+.2f} us); the GEMVs alone "
          f"{layers.gemvs_alone() / len(layers.o) * 1e6:.2f} us a layer", flush=True)
    key = (experts, hidden, layers.dtype.itemsize, True)
    return key, best, {"default_us": default_us, "best_us": timings[best],
                       "all_us": {str(tuple(c)): us for c, us in timings.items()}}


def tuned_source(device_name: str, tables: dict) -> str:
    lines = [f"# {device_name}: python -m tokenmill.benchmarks.kernels.fused_moe --sweep", f"{device_name!r}: {{"]
    for key, by_tokens in tables.items():
        lines.append(f"    {key}: {{")
        lines += [f"        {t}: MoeKernelConfig{tuple(c)}," for t, c in sorted(by_tokens.items())]
        lines.append("    },")
    lines.append("},")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-shapes", default=None, help="shapes to sweep (default: every measured one)")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--tuned-out", default="fused_moe_tuned.py")
    parser.add_argument("--gemv-sweep", action="store_true",
                        help="time the token-by-token path's configurations on the --sweep-shapes")
    parser.add_argument("--no-rows", action="store_true", help="only the sweeps asked for: no per-token-count rows")
    parser.add_argument("--router-sweep", action="store_true",
                        help="time the one-launch router's configurations on the --sweep-shapes")
    parser.add_argument("--write-table", action="store_true",
                        help="write --gemv-sweep's (and --router-sweep's) winners into ops/fused_moe_configs.py "
                             "for this GPU")
    args = parser.parse_args()
    device_name = torch.cuda.get_device_name()
    copy_gb_s = copy_rate(torch.cuda.current_device(), 2.0)
    peak = matmul_peak_tflops()
    print(f"{device_name}: copy {copy_gb_s:.0f} GB/s, bf16 matmul peak {peak:.0f} TFLOP/s (cuBLAS 8192^3)")
    result = {"device": device_name, "copy_gb_per_s": copy_gb_s, "matmul_tflops": peak, "rows": [], "tuned": {}}
    tables, gemv_winners, router_winners = {}, {}, {}
    for name in args.shapes.split(","):
        swept = name in (args.sweep_shapes or args.shapes).split(",")
        if args.router_sweep and swept:
            key, config, us = router_sweep_shape(name, SHAPES[name])
            router_winners[key] = (config, us)
            result.setdefault("router_sweep", {})[name] = {"config": list(config), **us}
            if args.write_table:
                print(write_table(fused_moe_configs.TUNED_ROUTER, "dict[tuple[int, int, int, bool], RouterConfig]",
                                  device_name, router_winners), flush=True)
        if args.no_rows and not ((args.gemv_sweep or args.sweep) and swept):
            continue
        layers = layers_for(SHAPES[name])
        if args.gemv_sweep and swept:
            key, config, us = gemv_sweep_shape(name, layers)
            gemv_winners[key] = (config, us)
            # The rows measured next (and the grouped sweep) run the winner, as the engine will.
            fused_moe_configs.TUNED_GEMV.setdefault(device_name, {})[key] = config
            result.setdefault("gemv_sweep", {})[name] = {"config": list(config), **us}
            if args.write_table:  # now, not after the rows below: a device call may end before them
                print(write_table(fused_moe_configs.TUNED_GEMV, "dict[tuple[int, int, int, int, int], MoeGemvConfig]",
                                  device_name, gemv_winners), flush=True)
        if not args.no_rows:
            result["rows"] += measure_shape(name, layers, copy_gb_s, peak)
        if args.sweep and swept:
            tables.update(sweep_shape(name, layers))
        del layers
        torch.cuda.empty_cache()
    if args.sweep:
        source = tuned_source(device_name, tables)
        with open(args.tuned_out, "w") as f:
            f.write(source)
        result["tuned"] = {str(k): {t: list(c) for t, c in v.items()} for k, v in tables.items()}
        print(f"tuned entries written to {args.tuned_out} (paste into ops/fused_moe_configs.TUNED)")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
