"""Batch-1 decode's decoder layer of Qwen3-30B-A3B as its decode graph runs it, kernel by kernel:
the QKV GEMV with the input norm, rope + q/k norms + KV write, the paged decode attention
(`batch1_attention.block_calls`), the O GEMV, the router with the post-attention norm
(`moe_routing.rms_norm_route_from_hidden`), the experts' gate/up and down GEMVs
(`fused_moe_gemv.fused_experts_gemv`), all launched dependent, over `--layers` distinct layers
cycled through 48 in one CUDA graph (a layer reads ~115 MB, so L2 serves none of it from the
layer before). Prints us per layer for each way of launching it, beside the floor of the bytes a
layer must read at the copy rate measured in the same run:

    as served        every kernel launched dependent on the one before (`ops/pdl.py`)
    + O to L2        the attention kernel asks L2 for the O GEMV's weights as it starts
                     (`ops/l2_prefetch.py`): they arrive while rope and attention, bound by
                     round trips, leave the memory system idle
    + QKV to L2      the router asks L2 for the next layer's QKV weights (evict-last, to outlive
                     the experts' stream) while it waits on the O GEMV
    QKV to L2        that alone

`--configs o:2x1024w4s1,...` (or `qkv:...`) adds the fastest way with that GEMV in those launch
configurations; `--sweep o` (or `qkv`) times every `SWEEP_GRID` configuration of it in the
fastest way instead, fastest first. Every way's outputs must equal the served way's bit for bit
(a prefetch changes no sum; another GEMV configuration does, and is not checked). Asserts nothing
about time. Needs a GPU with dependent launches (Hopper or later).

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
              for s in (1, 2, 3) if 1024 <= bn * bk <= 16384]
# name -> (attention prefetches O, router prefetches the next QKV)
WAYS = {"as served": (False, False), "+ O to L2": (True, False), "+ O, QKV to L2": (True, True),
        "QKV to L2": (False, True)}


class Layer:
    """One layer's weights and buffers (random: the routing is a uniform draw, as dummy weights
    route). `options` (shared with the attention blocks) is read at each call."""

    def __init__(self, attention, attention_out: torch.Tensor, dependent: bool, options: dict):
        self.attention, self.attention_out, self.dependent, self.options = attention, attention_out, dependent, options
        self.o = torch.randn(HIDDEN, HEADS * HEAD_DIM, dtype=DTYPE, device=DEVICE) * 0.02
        self.residual = torch.randn(1, HIDDEN, dtype=DTYPE, device=DEVICE)
        self.post_norm = torch.rand(HIDDEN, dtype=DTYPE, device=DEVICE) + 0.5
        self.router = torch.randn(EXPERTS, HIDDEN, dtype=DTYPE, device=DEVICE) * 0.02
        self.w13 = torch.randn(EXPERTS, 2 * MOE_INTER, HIDDEN, dtype=DTYPE, device=DEVICE) * 0.02
        self.w2 = torch.randn(EXPERTS, HIDDEN, MOE_INTER, dtype=DTYPE, device=DEVICE) * 0.02
        self.counter = new_router_counter(DEVICE)
        self.next_qkv: torch.Tensor | None = None  # the next layer's QKV weight

    def __call__(self) -> torch.Tensor:
        self.attention()
        dependent = self.dependent
        prefetch = self.next_qkv if self.options.get("router_prefetch") else None
        o = gemv(self.attention_out, self.o, pdl=dependent)
        weights, ids, normed, _ = rms_norm_route_from_hidden(
            o, self.residual, self.post_norm, EPS, self.router, TOP_K, False, True, 1.0, None, self.counter,
            pdl=dependent, prefetch=prefetch)
        return fused_experts_gemv(normed, self.w13, self.w2, weights, ids, pdl=dependent)

    def bytes_read(self, context: int) -> int:
        qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM * HIDDEN
        experts = TOP_K * 3 * MOE_INTER * HIDDEN
        kv = context * 2 * KV_HEADS * HEAD_DIM
        return 2 * (qkv + self.o.numel() + self.router.numel() + experts + kv)


def build_layers(count: int, context: int, options: dict, dependent: bool = True) -> list[Layer]:
    """`count` layers in a ring (the last one's next is the first, as the graph cycles through them);
    `dependent`: launched dependent (off only to run the layers where PDL is not)."""
    torch.manual_seed(0)
    attentions, outs, qkv_weights = block_calls(HEADS, KV_HEADS, context, count, dependent, options, hidden=HIDDEN)
    layers = [Layer(attention, out, dependent, options) for attention, out in zip(attentions, outs)]
    for i, layer in enumerate(layers):
        layer.next_qkv = qkv_weights[(i + 1) % count]
    options["o_weights"] = [layer.o for layer in layers]
    return layers


def set_way(options: dict, way: str) -> None:
    o_to_l2, qkv_to_l2 = WAYS[way]
    options.update(router_prefetch=qkv_to_l2,
                   attention_prefetch=options["o_weights"] if o_to_l2 else None)


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


def time_layers(layers: list[Layer]) -> tuple[float, list[torch.Tensor]]:
    """us per layer of GRAPH_LAYERS layer calls (cycling through `layers`) in one graph, and the
    outputs of its last pass through every layer."""
    outputs = [None] * len(layers)

    def call(i: int):
        def run():
            outputs[i % len(layers)] = layers[i % len(layers)]()
        return run

    us = graph_us([call(i) for i in range(GRAPH_LAYERS)])
    return us, [out.clone() for out in outputs]


def parse_configs(text: str) -> tuple[str, list[tuple]]:
    """"o:4x4096w8s1,2x4096w4s1" -> ("o", [(4, 4096, 8, 1), (2, 4096, 4, 1)])."""
    name, _, configs = text.partition(":")
    assert name in GEMV_KEYS, f"--configs: one of {sorted(GEMV_KEYS)}, then ':'"
    return name, [tuple(int(v) for v in c.replace("x", " ").replace("w", " ").replace("s", " ").split())
                  for c in configs.split(",") if c]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="distinct layers (~1.3 GB each)")
    parser.add_argument("--context", type=int, default=640, help="tokens attended (512/256 decode: 512-768)")
    parser.add_argument("--configs", default="o:2x1024w4s1,8x512w4s2",
                        help="a GEMV's launch configurations to time in the fastest way, NAME:BNxBKwWARPSsSTAGES,...")
    parser.add_argument("--sweep", choices=sorted(GEMV_KEYS), help="time every SWEEP_GRID configuration of this GEMV")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not pdl.supported(DEVICE):
        raise SystemExit("needs a GPU with dependent launches (ops/pdl.py)")
    from tokenmill.benchmarks.kernels.gemv import warm_compiles_in_parallel

    swept, configs = (args.sweep, None) if args.sweep else parse_configs(args.configs)
    key = GEMV_KEYS[swept]
    if configs is None:
        configs = [c for c in SWEEP_GRID if c[1] <= key[1]]
    warm_compiles_in_parallel([(False, key[1] if key[3] else 0)], True, configs=configs)
    rate = copy_rate(torch.cuda.current_device(), 2.0)
    name = torch.cuda.get_device_name(DEVICE)
    options: dict = {}
    layers = build_layers(args.layers, args.context, options)
    floor_us = layers[0].bytes_read(args.context) / rate / 1e3
    print(f"{name}; copy {rate:.0f} GB/s; a layer reads {layers[0].bytes_read(args.context) / 1e6:.1f} MB: "
          f"floor {floor_us:.2f} us; context {args.context}; {args.layers} distinct layers, {GRAPH_LAYERS} a graph",
          flush=True)
    result = {"device": name, "copy_gb_s": rate, "context": args.context, "layers": args.layers,
              "floor_us": floor_us, "ways": [], "configs": []}
    reference = None
    for way in WAYS:
        set_way(options, way)
        us, outputs = time_layers(layers)
        reference = reference if reference is not None else outputs
        if not all(torch.equal(a, b) for a, b in zip(outputs, reference)):
            raise AssertionError(f"{way}: the outputs differ from the served way's")
        result["ways"].append({"way": way, "us": us})
        print(f"  {way:32s} {us:7.2f} us a layer ({us / floor_us:.2f}x the floor)", flush=True)
    fastest = min(result["ways"], key=lambda r: r["us"])
    set_way(options, fastest["way"])
    print(f"{swept} GEMV configurations in the fastest way ({fastest['way']}; table's "
          f"{gemv_configs.tuned_config(layers[0].o if swept == 'o' else layers[0].next_qkv, False, True, key[3])}):",
          flush=True)
    for config in configs:
        with gemv_config(key, config):
            try:
                us, _ = time_layers(layers)
            except Exception as e:  # a configuration this GPU cannot launch (resources)
                print(f"  {config}: {type(e).__name__}: {e}"[:200], flush=True)
                continue
        result["configs"].append({"gemv": swept, "config": config, "way": fastest["way"], "us": us})
        if not args.sweep:
            print(f"  {swept} {config}: {us:7.2f} us a layer ({us / floor_us:.2f}x)", flush=True)
    if args.sweep:
        for row in sorted(result["configs"], key=lambda r: r["us"])[:12]:
            print(f"  {swept} {row['config']}: {row['us']:7.2f} us a layer ({row['us'] / floor_us:.2f}x)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
