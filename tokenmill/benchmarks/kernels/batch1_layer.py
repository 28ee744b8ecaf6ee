"""Batch-1 decode's decoder layer of Qwen3-30B-A3B as its decode graph runs it, kernel by kernel:
the QKV GEMV with the input norm, rope + q/k norms + KV write, the paged decode attention
(`batch1_attention.block_calls`), the O GEMV, the router with the post-attention norm
(`moe_routing.rms_norm_route_from_hidden`), the experts' gate/up and down GEMVs
(`fused_moe_gemv.fused_experts_gemv`), all launched dependent, over `--layers` distinct layers
cycled through 48 in one CUDA graph (a layer reads ~115 MB, so L2 serves none of it from the
layer before). Prints us per layer for each variant, beside the floor of the bytes a layer must
read at the copy rate measured in the same run:

    wait-first       every kernel waits before it lets the next one launch, as the engine's
                     decode graphs run them (`ops/pdl.py`)
    release-first    every kernel but the experts' gate/up lets the next launch before it waits,
                     so a kernel's launch and weight prologue overlap the whole of the kernel
                     before, not only its end
    ... + O <config> the same with the O GEMV in that launch configuration (`--o-configs`;
                     whole-row tiles read every weight of the program before its wait)

`--sweep o` (or `qkv`) times every `SWEEP_GRID` configuration of that GEMV inside the
release-first layer instead, fastest first (the QKV GEMV follows the experts' down GEMV, so
whole-row tiles there overlap that kernel's end). Every variant's outputs must equal wait-first's bit for bit (the
launch order changes no sum), which checks the waits. Asserts nothing about time. Needs a GPU
with dependent launches (Hopper or later).

    python3 -m tokenmill.benchmarks.kernels.batch1_layer [--layers 8] [--context 640] [--sweep o|qkv] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json

import torch

from tokenmill.benchmarks.kernels.attention_kernels import graph_us
from tokenmill.benchmarks.kernels.batch1_attention import DEVICE, DTYPE, HEAD_DIM, block_calls
from tokenmill.benchmarks.kernels.copy_bandwidth import copy_rate
from tokenmill.ops import gemv_configs, pdl
from tokenmill.ops.fused_moe_gemv import fused_experts_gemv
from tokenmill.ops.gemv import gemv
from tokenmill.ops.moe_routing import new_router_counter, rms_norm_route_from_hidden

HIDDEN, HEADS, KV_HEADS, EXPERTS, TOP_K, MOE_INTER, EPS, GRAPH_LAYERS = 2048, 32, 4, 128, 8, 768, 1e-6, 48
# gemv_configs.TUNED_PDL's keys (N, K, SiLU-and-mul, fused input norm) of the layer's dense GEMVs.
GEMV_KEYS = {"o": (HIDDEN, HEADS * HEAD_DIM, False, False),
             "qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, False, True)}
SWEEP_GRID = [(bn, bk, w, s) for bn in (1, 2, 4, 8, 16) for bk in (512, 1024, 2048, 4096) for w in (4, 8)
              for s in (1, 2) if 2048 <= bn * bk <= 16384]


class Layer:
    """One layer's weights and buffers (random: the routing is a uniform draw, as dummy weights route)."""

    def __init__(self, attention, attention_out: torch.Tensor, dependent: bool):
        self.attention, self.attention_out, self.dependent = attention, attention_out, dependent
        self.o = torch.randn(HIDDEN, HEADS * HEAD_DIM, dtype=DTYPE, device=DEVICE) * 0.02
        self.residual = torch.randn(1, HIDDEN, dtype=DTYPE, device=DEVICE)
        self.post_norm = torch.rand(HIDDEN, dtype=DTYPE, device=DEVICE) + 0.5
        self.router = torch.randn(EXPERTS, HIDDEN, dtype=DTYPE, device=DEVICE) * 0.02
        self.w13 = torch.randn(EXPERTS, 2 * MOE_INTER, HIDDEN, dtype=DTYPE, device=DEVICE) * 0.02
        self.w2 = torch.randn(EXPERTS, HIDDEN, MOE_INTER, dtype=DTYPE, device=DEVICE) * 0.02
        self.counter = new_router_counter(DEVICE)

    def __call__(self, release_first: bool) -> torch.Tensor:
        self.attention()
        dependent = self.dependent
        o = gemv(self.attention_out, self.o, pdl=dependent, release_first=release_first)
        weights, ids, normed, _ = rms_norm_route_from_hidden(
            o, self.residual, self.post_norm, EPS, self.router, TOP_K, False, True, 1.0, None, self.counter,
            pdl=dependent, release_first=release_first)
        return fused_experts_gemv(normed, self.w13, self.w2, weights, ids, pdl=dependent, release_first=release_first)

    def bytes_read(self, context: int) -> int:
        qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN
        experts = TOP_K * 3 * MOE_INTER * HIDDEN
        kv = context * 2 * KV_HEADS * HEAD_DIM
        return 2 * (qkv + self.o.numel() + self.router.numel() + experts + kv)


def build_layers(count: int, context: int, release_first: bool, dependent: bool = True) -> list[Layer]:
    """`count` layers whose attention blocks release first or not (a block's kernels are fixed at
    build); `dependent`: launched dependent (off only to run the layer where PDL is not)."""
    torch.manual_seed(0)
    attentions, outs = block_calls(HEADS, KV_HEADS, context, count, dependent, release_first, hidden=HIDDEN)
    return [Layer(attention, out, dependent) for attention, out in zip(attentions, outs)]


@contextlib.contextmanager
def gemv_config(key: tuple, config: tuple | None):
    """The GEMV of `key` launched in `config` (block_n, block_k, warps, stages) while inside; None: the table's."""
    if config is None:
        yield
        return
    name = torch.cuda.get_device_name(DEVICE)
    saved = gemv_configs.TUNED_PDL.get(name)
    gemv_configs.TUNED_PDL[name] = {**(saved or {}), key: gemv_configs.GemvConfig(*config)}
    try:
        yield
    finally:
        if saved is None:
            del gemv_configs.TUNED_PDL[name]
        else:
            gemv_configs.TUNED_PDL[name] = saved


def time_layers(layers: list[Layer], release_first: bool) -> tuple[float, list[torch.Tensor]]:
    """us per layer of GRAPH_LAYERS layer calls (cycling through `layers`) in one graph, and the
    outputs of its last pass through every layer."""
    outputs = [None] * len(layers)

    def call(i: int):
        def run():
            outputs[i % len(layers)] = layers[i % len(layers)](release_first)
        return run

    us = graph_us([call(i) for i in range(GRAPH_LAYERS)])
    return us, [out.clone() for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="distinct layers (~1.3 GB each)")
    parser.add_argument("--context", type=int, default=640, help="tokens attended (512/256 decode: 512-768)")
    parser.add_argument("--o-configs", default="4x4096w8s1,2x4096w4s1,8x2048w8s1",
                        help="O GEMV configurations to time in the release-first layer, BNxBKwWARPSsSTAGES")
    parser.add_argument("--sweep", choices=sorted(GEMV_KEYS), help="time every SWEEP_GRID configuration of this GEMV")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not pdl.supported(DEVICE):
        raise SystemExit("needs a GPU with dependent launches (ops/pdl.py)")
    from tokenmill.benchmarks.kernels.gemv import warm_compiles_in_parallel

    swept = args.sweep or "o"
    key = GEMV_KEYS[swept]
    configs = [c for c in SWEEP_GRID if c[1] <= key[1]] if args.sweep else [
        tuple(int(v) for v in c.replace("x", " ").replace("w", " ").replace("s", " ").split())
        for c in args.o_configs.split(",") if c]
    for release_first in (False, True):
        warm_compiles_in_parallel([(False, key[1] if key[3] else 0)], True, configs=configs,
                                  release_first=release_first)
    rate = copy_rate(torch.cuda.current_device(), 2.0)
    name = torch.cuda.get_device_name(DEVICE)
    result = {"device": name, "copy_gb_s": rate, "context": args.context, "layers": args.layers, "rows": []}
    reference = None
    for release_first in (False, True):
        layers = build_layers(args.layers, args.context, release_first)
        floor_us = layers[0].bytes_read(args.context) / rate / 1e3
        if reference is None:
            print(f"{name}; copy {rate:.0f} GB/s; a layer reads {layers[0].bytes_read(args.context) / 1e6:.1f} MB: "
                  f"floor {floor_us:.2f} us; context {args.context}; {args.layers} distinct layers, "
                  f"{GRAPH_LAYERS} a graph; O table entry {gemv_configs.tuned_config(layers[0].o, False, True)}",
                  flush=True)
        variants = [None] if not release_first else [None, *configs]
        rows = []
        for config in variants:
            with gemv_config(key, config):
                try:
                    us, outputs = time_layers(layers, release_first)
                except Exception as e:  # a configuration this GPU cannot launch (resources)
                    print(f"  O {config}: {type(e).__name__}: {e}"[:200], flush=True)
                    continue
            if reference is None:
                reference = outputs
            same = all(torch.equal(a, b) for a, b in zip(outputs, reference))
            # Another O configuration sums in another order: the table's must match bit for bit.
            if config is None and not same:
                raise AssertionError(f"release_first={release_first}: the outputs differ from wait-first's")
            label = ("release-first" if release_first else "wait-first") + (f" + {swept} {config}" if config else "")
            rows.append({"variant": label, "release_first": release_first, "gemv": swept, "config": config, "us": us,
                         "floor_us": floor_us, "same_outputs": same})
            if not args.sweep or config is None:
                print(f"  {label:40s} {us:7.2f} us a layer ({us / floor_us:.2f}x the floor)", flush=True)
        if args.sweep and release_first:
            for row in sorted(rows[1:], key=lambda r: r["us"])[:12]:
                print(f"  {row['variant']:40s} {row['us']:7.2f} us a layer ({row['us'] / floor_us:.2f}x)", flush=True)
        result["rows"].extend(rows)
        del layers
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
