"""Does programmatic dependent launch (PDL) shorten a chain of batch-1 GEMVs inside a CUDA graph?

A decode step at batch 1 is ~10 small kernels per layer, one after another. Between two kernels
the GPU drains the first and ramps up the second; at tensor parallelism the all-reduce adds a
kernel that mostly waits on NVLink. With PDL a kernel may launch while its predecessor still runs,
start pulling its weights (which do not depend on the predecessor) into L2, and wait only before
it reads the predecessor's output.

This builds the Llama-3.1-8B per-rank GEMV chain (`--tp` splits the shapes as tensor parallelism
would) for `--layers` layers, optionally with a "wait" kernel standing in for each all-reduce
(one program spinning `--wait-us`), captures it in a CUDA graph three ways (plain launches; PDL;
PDL + L2 prefetch) and prints the replay time of each and its weight bandwidth beside the
device-to-device copy rate. Every variant's output is checked against the plain one, over several
replays on changing input, so a missing wait would show as a wrong result.

    python3 scripts/bench_pdl.py [--tp 2] [--layers 32] [--wait-us 5] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from tokenmill.model.layers.triton_gemv import gemv


@triton.jit
def _global_time_ns():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _wait_kernel(x_ptr, y_ptr, n, wait_ns, PDL: tl.constexpr, BLOCK: tl.constexpr):
    """y = x after spinning wait_ns: an all-reduce's shape in time (one program, mostly waiting)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
    start = _global_time_ns()
    now = start
    while now - start < wait_ns:
        now = _global_time_ns()
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def wait(x: torch.Tensor, wait_ns: int, pdl: bool) -> torch.Tensor:
    y = torch.empty_like(x)
    _wait_kernel[(1,)](x, y, x.numel(), wait_ns, PDL=pdl, BLOCK=triton.next_power_of_2(x.numel()),
                       launch_pdl=pdl)
    return y


def make_layers(n_layers: int, tp: int, device: str):
    hidden, inter, q, kv = 4096, 14336, 4096, 1024
    shapes = [((q + 2 * kv) // tp, hidden), (hidden, q // tp), (2 * inter // tp, hidden), (hidden, inter // tp)]
    g = torch.Generator(device=device).manual_seed(0)
    return [[torch.randn(s, generator=g, device=device, dtype=torch.bfloat16) / s[1] ** 0.5 for s in shapes]
            for _ in range(n_layers)]


def chain(x, layers, wait_ns: int, pdl: bool, prefetch: int):
    """x [1, 4096] through every layer's qkv -> o -> (wait) -> gate_up -> down -> (wait)."""
    for wqkv, wo, wgu, wd in layers:
        h = gemv(x, wqkv, pdl, prefetch)
        h = gemv(h[:, : wo.shape[1]], wo, pdl, prefetch)
        if wait_ns:
            h = wait(h, wait_ns, pdl)
        h = gemv(h, wgu, pdl, prefetch)
        h = gemv(h[:, : wd.shape[1]], wd, pdl, prefetch)
        if wait_ns:
            h = wait(h, wait_ns, pdl)
        x = h  # weights are scaled by 1/sqrt(K), so values stay O(1) through the chain
    return x


def run_variant(name, layers, wait_ns, pdl, prefetch, inputs, reference):
    static_x = inputs[0].clone()
    for _ in range(3):  # warm-up (autotunes outside capture)
        chain(static_x, layers, wait_ns, pdl, prefetch)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = chain(static_x, layers, wait_ns, pdl, prefetch)
    worst = 0.0
    for x, ref in zip(inputs, reference):
        static_x.copy_(x)
        graph.replay()
        worst = max(worst, (static_y.float() - ref.float()).abs().max().item())
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    times.sort()
    return {"variant": name, "us": times[len(times) // 2], "max_abs_diff_vs_plain_eager": worst}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--wait-us", type=float, nargs="+", default=[0.0, 5.0])
    p.add_argument("--prefetch-mb", type=float, nargs="+", default=[8.0, 16.0, 32.0])
    p.add_argument("--output-json")
    args = p.parse_args()
    from scripts.copy_bandwidth import copy_rate
    copy = copy_rate(0, 2.0)
    layers = make_layers(args.layers, args.tp, "cuda")
    weight_bytes = sum(w.numel() * w.element_size() for layer in layers for w in layer)
    inputs = [torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    results = []
    print(f"{torch.cuda.get_device_name()}: copy rate {copy:.0f} GB/s; TP={args.tp} shapes, {args.layers} layers, "
          f"{weight_bytes / 1e9:.2f} GB of weights (floor {weight_bytes / copy / 1e3:.0f} us)")
    for wait_us in args.wait_us:
        wait_ns = int(wait_us * 1000)
        reference = [chain(x, layers, wait_ns, False, 0) for x in inputs]
        variants = [("plain", False, 0), ("pdl", True, 0)] + [
            (f"pdl+prefetch{mb:g}MB", True, int(mb * 2**20)) for mb in args.prefetch_mb]
        base = None
        for name, pdl, prefetch in variants:
            r = run_variant(name, layers, wait_ns, pdl, prefetch, inputs, reference)
            r.update(wait_us=wait_us, tp=args.tp, weight_gb_per_s=weight_bytes / r["us"] / 1e3)
            base = base or r["us"]
            r["speedup_vs_plain"] = base / r["us"]
            results.append(r)
            print(f"wait {wait_us:4.1f} us  {name:22s} {r['us']:9.1f} us/chain  {r['weight_gb_per_s']:6.0f} GB/s  "
                  f"{r['speedup_vs_plain']:.3f}x plain  max|diff| {r['max_abs_diff_vs_plain_eager']:.3g}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_gb_per_s": copy, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
