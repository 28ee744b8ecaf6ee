"""Micro-benchmark of the Triton paged-decode kernel (and, briefly, prefill and the fused ops)
at Llama-3.1-8B attention shapes: 32 query heads, 8 KV heads, head_dim 128, bf16, block size 16.

For decode it prints, per (batch, context): the Triton kernel's median time, the bytes it must read
(K and V of every context token, plus q and out) over that time as GB/s, the floor time at the
device-to-device copy rate measured in the same run, and torch_native's time on the same inputs.
Times are `triton.testing.do_bench` medians, which clears L2 before each call. Prints; asserts
nothing about time.

Usage: python3 -m tokenmill.benchmarks.kernels.attention_kernels [--json PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
from collections.abc import Callable

import torch
import triton
from triton.testing import do_bench

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.torch_native import TorchNativeBackend
from tokenmill.ops.attention_common import LaunchConfig
from tokenmill.ops.attention_decode import DECODE_CONFIG, decode_num_splits, new_split_counters, paged_decode
from tokenmill.ops.attention_prefill import PREFILL_CONFIG, paged_prefill
from tokenmill.ops.activation import silu_and_mul, silu_and_mul_ref
from tokenmill.ops.rms_norm import rms_norm, rms_norm_ref
from tokenmill.ops.rotary import rope_neox_, rope_neox_ref

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")


def copy_rate_bytes_per_s() -> float:
    """Device-to-device copy of 2 GiB, counting bytes read plus written."""
    src = torch.empty(1 << 30, dtype=torch.int16, device=DEVICE).random_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    del src, dst
    return 2 * (1 << 31) / (ms * 1e-3)


def graph_us(fns: list[Callable[[], object]], replays: int = 20) -> float:
    """Median time per call of `fns`, captured back to back in one CUDA graph (no launch gaps),
    over 5 timed rounds of `replays` replays."""
    for fn in fns:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / (replays * len(fns)))
    del graph
    return statistics.median(times) * 1e3


def rotated_decode_calls(batch: int, context: int, scale: float, kv_dtype: torch.dtype = DTYPE,
                         shared: int = 0, heads: tuple[int, int] = (NUM_HEADS, NUM_KV_HEADS), active: int | None = None,
                         max_seq_len: int | None = None, **kwargs) -> list[Callable[[], None]]:
    """Decode calls over enough distinct input sets (>= 256 MB together) that L2 (50 MB) holds
    none of them when it is read again. `heads`: (query, KV) heads; `active`: requests with a
    context (the rest are a padded graph's empty rows); `max_seq_len`: what sizes the split count
    (a decode graph's: the model's length)."""
    kv_bytes = 2 * (active or batch) * context * heads[1] * HEAD_DIM * kv_dtype.itemsize
    calls = []
    counters = new_split_counters(batch * heads[1], DEVICE)  # shared, as in the backend
    for _ in range(max(1, min(64, math.ceil(256e6 / kv_bytes)))):
        q, k_cache, v_cache, block_table, seq_lens = make_decode_inputs(batch, context, kv_dtype, shared, heads,
                                                                        active)
        out = torch.empty_like(q)
        calls.append(functools.partial(
            paged_decode, q, k_cache, v_cache, block_table, seq_lens, out, max_seq_len or context, scale,
            split_counters=counters, **kwargs))
    return calls


def make_decode_inputs(batch: int, context: int, kv_dtype: torch.dtype = DTYPE, shared: int = 0,
                       heads: tuple[int, int] = (NUM_HEADS, NUM_KV_HEADS), active: int | None = None):
    """Random q and cache; every request's block-table row is a random set of blocks, except that
    the blocks of its first `shared` tokens (whole blocks) are the same physical blocks in every
    row, as the prefix cache leaves a shared prompt prefix. Requests past `active` have no context."""
    blocks_per_req = math.ceil(context / BLOCK_SIZE)
    shared_blocks = shared // BLOCK_SIZE
    num_blocks = shared_blocks + batch * (blocks_per_req - shared_blocks)
    shape = (num_blocks, BLOCK_SIZE, heads[1], HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE).to(kv_dtype)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE).to(kv_dtype)
    ids = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32)
    own = ids[shared_blocks:].view(batch, blocks_per_req - shared_blocks)
    block_table = torch.cat([ids[:shared_blocks].expand(batch, shared_blocks), own], dim=1).contiguous()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    if active is not None:
        seq_lens[active:] = 0
    q = torch.randn(batch, heads[0], HEAD_DIM, dtype=DTYPE, device=DEVICE)
    return q, k_cache, v_cache, block_table, seq_lens


def split_sweep(spec: str, copy_rate: float) -> list[dict]:
    """`spec` "HEADS,KV_HEADS,ACTIVE,PADDED,CONTEXT,MAX_LEN": a decode graph of PADDED requests
    (ACTIVE of them at CONTEXT tokens, the rest empty, as a padded graph replays) whose split count
    was sized for MAX_LEN (the model's length, as at capture), at the heuristic's split count and
    others; graph_us against the bytes' floor."""
    heads, kv_heads, active, padded, context, max_len = (int(v) for v in spec.split(","))
    scale = HEAD_DIM ** -0.5
    default = decode_num_splits(padded, kv_heads, max_len, DEVICE)
    kv_bytes = 2 * active * context * kv_heads * HEAD_DIM * 2
    floor_us = kv_bytes / copy_rate * 1e6
    rows = []
    print(f"\n# split sweep: {heads} q / {kv_heads} kv heads, {active} of {padded} requests at {context} tokens, "
          f"splits sized for {max_len} (heuristic: {default}); floor {floor_us:.1f} us")
    for splits in sorted({default, 2, 4, 8, 12, 16, 24, 32}):
        t = graph_us(rotated_decode_calls(padded, context, scale, heads=(heads, kv_heads), active=active,
                                          max_seq_len=max_len, num_splits=splits))
        rows.append({"spec": spec, "splits": splits, "graph_us": t, "floor_us": floor_us, "default": splits == default})
        print(f"splits={splits:3d}{' (heuristic)' if splits == default else '':12s} {t:8.1f} us  "
              f"{kv_bytes / (t * 1e-6) / 1e9:6.0f} GB/s  {t / floor_us:5.2f}x floor", flush=True)
        torch.cuda.empty_cache()
    return rows


def bench_decode(copy_rate: float) -> list[dict]:
    rows = []
    scale = HEAD_DIM ** -0.5
    for batch in (1, 32, 256):
        for context in (512, 2048, 8192, 32768):
            kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
            if kv_bytes > 40e9:
                continue
            q, k_cache, v_cache, block_table, seq_lens = make_decode_inputs(batch, context)
            out = torch.empty_like(q)
            splits = decode_num_splits(batch, NUM_KV_HEADS, context, DEVICE)
            counters = new_split_counters(batch * NUM_KV_HEADS, DEVICE)
            ms = do_bench(
                lambda: paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, context, scale,
                                     split_counters=counters),
                warmup=25, rep=200, return_mode="median",
            )
            bytes_read = kv_bytes + 2 * q.numel() * q.element_size()
            calls = rotated_decode_calls(batch, context, scale)
            t_graph = graph_us(calls)
            del calls
            row = {
                "batch": batch, "context": context, "splits": splits, "triton_us": ms * 1e3,
                "graph_us": t_graph, "gb_per_s": bytes_read / (t_graph * 1e-6) / 1e9,
                "floor_us": bytes_read / copy_rate * 1e6,
            }
            # torch_native gathers a padded copy of the whole context: skip it where that is huge.
            if 3 * kv_bytes < 30e9:
                meta = AttentionMetadata(
                    num_reqs=batch, num_tokens=batch, num_decodes=batch, max_query_len=1,
                    max_seq_len=context, query_start_loc=torch.arange(batch + 1, device=DEVICE, dtype=torch.int32),
                    seq_lens=seq_lens, block_table=block_table,
                    slot_mapping=torch.full((batch,), -1, dtype=torch.int64, device=DEVICE),
                    query_start_loc_cpu=torch.arange(batch + 1, dtype=torch.int32), seq_lens_cpu=seq_lens.cpu(),
                )
                ms_native = do_bench(
                    lambda: TorchNativeBackend._decode(q, (k_cache, v_cache), meta, scale, (1.0, 1.0)),
                    warmup=10, rep=100, return_mode="median",
                )
                row["native_us"] = ms_native * 1e3
            rows.append(row)
            print(_fmt_decode(row), flush=True)
            del q, k_cache, v_cache, block_table, seq_lens, out
            torch.cuda.empty_cache()
    return rows


def _fmt_decode(r: dict) -> str:
    native = f"{r['native_us']:10.1f}" if "native_us" in r else f"{'-':>10}"
    speedup = f"{r['native_us'] / r['triton_us']:7.1f}x" if "native_us" in r else f"{'-':>8}"
    return (f"{r['batch']:6d} {r['context']:8d} {r['splits']:6d} {r['graph_us']:9.1f} {r['floor_us']:9.1f} "
            f"{r['gb_per_s']:7.0f} {100 * r['floor_us'] / r['graph_us']:6.0f}% {r['triton_us']:9.1f} {native} {speedup}")


def bench_prefill() -> list[dict]:
    """One request: a chunk of `q_len` new tokens after `prefix` cached ones (causal)."""
    rows = []
    scale = HEAD_DIM ** -0.5
    for q_len, prefix in ((2048, 0), (2048, 8192), (8192, 0)):
        seq_len = q_len + prefix
        q, k_cache, v_cache, block_table, _ = make_decode_inputs(1, seq_len)
        q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        k = torch.randn(q_len, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        v = torch.randn(q_len, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        out = torch.empty_like(q)
        qsl = torch.tensor([0, q_len], dtype=torch.int32, device=DEVICE)
        sl = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
        ms = do_bench(lambda: paged_prefill(q, k, v, k_cache, v_cache, block_table, qsl, sl, out, 0, 1, q_len, scale),
                      warmup=25, rep=200, return_mode="median")
        # Causal: each query sees its prefix plus on average half the chunk.
        flops = 4 * NUM_HEADS * HEAD_DIM * q_len * (prefix + q_len / 2)
        # SDPA (flash) on contiguous K/V of the same length, as a dense-attention yardstick.
        kq = torch.randn(1, NUM_HEADS, seq_len, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        qq = q.transpose(0, 1).unsqueeze(0)
        mask = None
        if prefix:
            mask = torch.arange(seq_len, device=DEVICE)[None, :] <= torch.arange(prefix, seq_len, device=DEVICE)[:, None]
        ms_sdpa = do_bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qq, kq, kq, attn_mask=mask, is_causal=mask is None, scale=scale), warmup=25, rep=200, return_mode="median")
        row = {"q_len": q_len, "prefix": prefix, "triton_us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12,
               "sdpa_dense_us": ms_sdpa * 1e3}
        rows.append(row)
        print(f"{q_len:6d} {prefix:7d} {row['triton_us']:10.1f} {row['tflops']:8.1f} {row['sdpa_dense_us']:12.1f}", flush=True)
    return rows


def bench_ops() -> list[dict]:
    """Fused ops against their eager torch references at Llama-3.1-8B shapes."""
    rows = []
    for num_tokens in (1, 256, 4096):
        x = torch.randn(num_tokens, 4096, dtype=DTYPE, device=DEVICE)
        res = torch.randn_like(x)
        w = torch.randn(4096, dtype=DTYPE, device=DEVICE)
        gate_up = torch.randn(num_tokens, 2 * 14336, dtype=DTYPE, device=DEVICE)
        qkv = torch.randn(num_tokens, 6144, dtype=DTYPE, device=DEVICE)
        q = qkv[:, :4096].view(num_tokens, 32, 128)
        k = qkv[:, 4096:5120].view(num_tokens, 8, 128)
        pos = torch.randint(0, 8192, (num_tokens,), device=DEVICE)
        cache = torch.randn(131072, 128, dtype=torch.float32, device=DEVICE)
        cases = {
            "rms_norm+residual": (lambda: rms_norm(x, w, 1e-5, res), lambda: rms_norm_ref(x, w, 1e-5, res)),
            "silu_and_mul": (lambda: silu_and_mul(gate_up), lambda: silu_and_mul_ref(gate_up)),
            "rope_neox": (lambda: rope_neox_(q, k, pos, cache), lambda: rope_neox_ref(q, k, pos, cache)),
        }
        for name, (fused, ref) in cases.items():
            t_fused = do_bench(fused, warmup=10, rep=100, return_mode="median") * 1e3
            t_ref = do_bench(ref, warmup=10, rep=100, return_mode="median") * 1e3
            rows.append({"op": name, "num_tokens": num_tokens, "fused_us": t_fused, "torch_us": t_ref})
            print(f"{name:18s} {num_tokens:6d} {t_fused:9.1f} {t_ref:9.1f} {t_ref / t_fused:7.1f}x", flush=True)
    return rows


def sweep(copy_rate: float) -> dict:
    """Tile/launch configurations and split counts, to pick the defaults from."""
    scale = HEAD_DIM ** -0.5
    result = {"decode": [], "prefill": []}
    print("\n# sweep: decode (graph_us), block_n/warps/stages/splits; default config first")
    decode_configs = [DECODE_CONFIG, LaunchConfig(0, 128, 4, 3)]
    for batch, context in ((1, 512), (1, 2048), (1, 8192), (1, 32768), (32, 512), (32, 2048)):
        kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * 2
        default_splits = decode_num_splits(batch, NUM_KV_HEADS, context, DEVICE)
        split_options = sorted({default_splits, max(1, default_splits // 2), 2 * default_splits,
                                4 * default_splits} if batch < 256 else {1, 2})
        for cfg in decode_configs:
            for splits in split_options:
                t = graph_us(rotated_decode_calls(batch, context, scale, num_splits=splits, config=cfg))
                result["decode"].append({"batch": batch, "context": context, "block_n": cfg.block_n,
                                         "warps": cfg.num_warps, "stages": cfg.num_stages,
                                         "splits": splits, "graph_us": t})
                print(f"b={batch:4d} ctx={context:6d} block_n={cfg.block_n:4d} warps={cfg.num_warps} "
                      f"stages={cfg.num_stages} splits={splits:3d}: {t:8.1f} us "
                      f"{kv_bytes / (t * 1e-6) / 1e9:6.0f} GB/s", flush=True)
            torch.cuda.empty_cache()
    print("\n# sweep: prefill (do_bench us); default config first")
    prefill_configs = [PREFILL_CONFIG, LaunchConfig(64, 64, 4, 3), LaunchConfig(128, 64, 8, 3)]
    for q_len, prefix in ((2048, 0), (8192, 0), (2048, 8192), (512, 0)):
        seq_len = q_len + prefix
        _, k_cache, v_cache, block_table, _ = make_decode_inputs(1, seq_len)
        q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        k = torch.randn(q_len, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        v = torch.randn(q_len, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        qsl = torch.tensor([0, q_len], dtype=torch.int32, device=DEVICE)
        sl = torch.tensor([seq_len], dtype=torch.int32, device=DEVICE)
        ref = torch.empty_like(q)
        paged_prefill(q, k, v, k_cache, v_cache, block_table, qsl, sl, ref, 0, 1, q_len, scale)
        for cfg in prefill_configs:
            out = torch.full_like(q, float("nan"))
            fn = functools.partial(paged_prefill, q, k, v, k_cache, v_cache, block_table, qsl, sl, out, 0, 1, q_len,
                                   scale, config=cfg)
            fn()
            err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            t = do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
            flops = 4 * NUM_HEADS * HEAD_DIM * q_len * (prefix + q_len / 2)
            result["prefill"].append({"q_len": q_len, "prefix": prefix, "block_m": cfg.block_m,
                                      "block_n": cfg.block_n, "warps": cfg.num_warps,
                                      "stages": cfg.num_stages, "us": t, "rel_err_vs_default": err})
            print(f"q={q_len:5d} prefix={prefix:5d} block_m={cfg.block_m:3d} block_n={cfg.block_n:3d} "
                  f"warps={cfg.num_warps} stages={cfg.num_stages}: {t:8.1f} us "
                  f"{flops / (t * 1e-6) / 1e12:6.1f} TFLOP/s  err_vs_default={err:.1e}", flush=True)
    return result


def compare_kv_dtypes(copy_rate: float) -> dict:
    """bf16 against fp8 caches at the prefix-caching benchmark's shapes (issue 5: 2,048-token
    prompts, 75% of them cached): decode over ~2k-token contexts at batch 1, 32 and 128 (graph
    replay, L2-cold), and the prefill of 512 new tokens after 1,536 cached ones for 16 requests
    (one 8k-token step), beside a fresh 2,048-token prompt. Results are checked against each other
    (the fp8 run on the same values rounded to fp8)."""
    fp8 = torch.float8_e4m3fn
    scale = HEAD_DIM ** -0.5
    result = {"decode": [], "prefill": []}
    print("\n# bf16 vs fp8 KV cache, decode (graph_us, L2-cold)")
    for batch, context in ((1, 2048), (32, 2048), (128, 2048), (128, 2176)):
        row = {"batch": batch, "context": context}
        for dtype in (DTYPE, fp8):
            t = graph_us(rotated_decode_calls(batch, context, scale, kv_dtype=dtype))
            kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
            row[str(dtype).split(".")[-1]] = {"us": t, "gb_per_s": kv_bytes / (t * 1e-6) / 1e9,
                                              "floor_us": kv_bytes / copy_rate * 1e6}
            torch.cuda.empty_cache()
        result["decode"].append(row)
        b, f = row["bfloat16"], row["float8_e4m3fn"]
        print(f"b={batch:4d} ctx={context:5d}: bf16 {b['us']:8.1f} us ({b['gb_per_s']:5.0f} GB/s, floor "
              f"{b['floor_us']:7.1f}); fp8 {f['us']:8.1f} us ({f['gb_per_s']:5.0f} GB/s, floor {f['floor_us']:7.1f}); "
              f"fp8/bf16 time {f['us'] / b['us']:.2f}", flush=True)
    print("\n# bf16 vs fp8 KV cache, prefill (do_bench us): requests x (cached + new)")
    for reqs, cached, new in ((16, 1536, 512), (4, 0, 2048), (4, 6144, 2048)):
        seq_len = cached + new
        q = torch.randn(reqs * new, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        k = torch.randn(reqs * new, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        v = torch.randn_like(k)
        qsl = torch.arange(0, reqs + 1, dtype=torch.int32, device=DEVICE) * new
        sl = torch.full((reqs,), seq_len, dtype=torch.int32, device=DEVICE)
        _, k_cache, v_cache, block_table, _ = make_decode_inputs(reqs, seq_len)
        row = {"requests": reqs, "cached": cached, "new": new}
        outs = {}
        for dtype in (DTYPE, fp8):
            kc, vc = k_cache.to(dtype), v_cache.to(dtype)
            out = torch.empty_like(q)
            fn = functools.partial(paged_prefill, q, k, v, kc, vc, block_table, qsl, sl, out, 0, reqs, new, scale)
            fn()
            outs[dtype] = out
            ms = do_bench(fn, warmup=10, rep=100, return_mode="median")
            flops = 4 * NUM_HEADS * HEAD_DIM * reqs * new * (cached + new / 2)
            row[str(dtype).split(".")[-1]] = {"us": ms * 1e3, "tflops": flops / (ms * 1e-3) / 1e12}
        # fp8 reference: the same kernel on a bf16 cache holding the fp8-rounded values.
        ref = torch.empty_like(q)
        paged_prefill(q, k, v, k_cache.to(fp8).to(DTYPE), v_cache.to(fp8).to(DTYPE), block_table, qsl, sl,
                      ref, 0, reqs, new, scale)
        row["fp8_rel_err"] = float((outs[fp8].float() - ref.float()).norm() / ref.float().norm())
        result["prefill"].append(row)
        b, f = row["bfloat16"], row["float8_e4m3fn"]
        print(f"{reqs:3d} x ({cached:5d} + {new:5d}): bf16 {b['us']:8.1f} us ({b['tflops']:5.0f} TFLOP/s); "
              f"fp8 {f['us']:8.1f} us ({f['tflops']:5.0f} TFLOP/s); fp8/bf16 time {f['us'] / b['us']:.2f}; "
              f"fp8 err vs rounded bf16 {row['fp8_rel_err']:.1e}", flush=True)
        del k_cache, v_cache
        torch.cuda.empty_cache()
    return result


def compare_shared_prefix(copy_rate: float) -> dict:
    """Decode when the first `shared` tokens of every context are the same physical blocks, as
    with a prefix-cache hit (the prefix benchmark: 128 requests, 2,048-token prompts, 75% shared,
    plus up to 128 generated tokens): the plain kernel (which reads the shared blocks once per
    request, from L2 at best) against cascade attention (ops/attention_cascade.py), on the same inputs,
    L2-cold between calls. `unique_floor_us`: each distinct block read once at the copy rate."""
    from tokenmill.ops.attention_cascade import cascade_decode

    scale = HEAD_DIM ** -0.5
    rows = []
    token_bytes = 2 * NUM_KV_HEADS * HEAD_DIM * 2
    print("\n# decode with a shared prefix: plain vs cascade (graph_us, L2-cold between calls)")
    for batch, context in ((128, 2176), (128, 2048), (32, 2176), (64, 2176), (256, 2176), (128, 8192)):
        for shared in (0, 256, 512, 1536) if context < 8192 else (0, 6144):
            plain = rotated_decode_calls(batch, context, scale, shared=shared)
            # (paged_decode's arguments: q, k_cache, v_cache, block_table, seq_lens, out, ...;
            # cascade_decode takes prefix_len before out, and writes the same out)
            cascade = [functools.partial(cascade_decode, c.args[0], c.args[1], c.args[2], c.args[3], c.args[4],
                                         torch.tensor([shared], dtype=torch.int32, device=DEVICE), c.args[5], scale)
                       for c in plain]
            check = plain[0]
            check()
            want = check.args[5].clone()
            cascade[0]()
            err = float((check.args[5].float() - want.float()).norm() / want.float().norm())
            t_plain = graph_us(plain)
            t_cascade = graph_us(cascade)
            unique_bytes = (shared + batch * (context - shared)) * token_bytes
            row = {"batch": batch, "context": context, "shared": shared, "plain_us": t_plain,
                   "cascade_us": t_cascade, "cascade_rel_err": err,
                   "floor_us": batch * context * token_bytes / copy_rate * 1e6,
                   "unique_floor_us": unique_bytes / copy_rate * 1e6}
            rows.append(row)
            print(f"b={batch:4d} ctx={context:5d} shared={shared:5d}: plain {t_plain:8.1f} us, cascade "
                  f"{t_cascade:8.1f} us ({t_plain / t_cascade:4.2f}x); floors: all reads {row['floor_us']:7.1f}, "
                  f"distinct blocks once {row['unique_floor_us']:7.1f}; cascade vs plain rel err {err:.1e}",
                  flush=True)
            if shared == 1536 and batch in (64, 128):  # the prefix kernel's tile rows and split count
                for block_m in (32, 64):
                    for splits in range(1, 8):
                        t = graph_us([functools.partial(c, num_prefix_splits=splits, prefix_block_m=block_m)
                                      for c in cascade])
                        row[f"cascade_us_m{block_m}_{splits}_splits"] = t
                        print(f"    {block_m} rows, {splits} prefix splits: {t:8.1f} us", flush=True)
            del plain, cascade, check
            torch.cuda.empty_cache()
    return {"decode_shared_prefix": rows}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep", action="store_true", help="also sweep tile configs and split counts")
    parser.add_argument("--kv-compare", action="store_true",
                        help="only the bf16 vs fp8 KV cache comparison (compare_kv_dtypes)")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="only decode with a shared prefix (compare_shared_prefix)")
    parser.add_argument("--split-sweep", action="append", default=[], metavar="H,KVH,ACTIVE,PADDED,CTX,MAXLEN",
                        help="only split counts of a padded decode graph (repeatable): e.g. Qwen3-30B-A3B at ten "
                             "requests of 2,624 tokens in the 16-request graph of a 4,096-token model: 32,4,10,16,2624,4096")
    args = parser.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    copy_rate = copy_rate_bytes_per_s()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}; copy rate {copy_rate / 1e12:.2f} TB/s (read + write)")
    if args.split_sweep:
        rows = [row for spec in args.split_sweep for row in split_sweep(spec, copy_rate)]
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": props.name, "copy_rate_tb_s": copy_rate / 1e12, "split_sweep": rows}, f, indent=1)
        return
    if args.kv_compare or args.shared_prefix:
        result = compare_kv_dtypes(copy_rate) if args.kv_compare else compare_shared_prefix(copy_rate)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": props.name, "copy_rate_tb_s": copy_rate / 1e12, **result}, f, indent=1)
        return
    print("\n# paged decode, Llama-3.1-8B attention (32 q / 8 kv heads, d=128, bf16, block 16); one layer")
    print("graph_us: CUDA-graph replay, L2-cold inputs; GB/s and %floor from it. eager_us and native_us:")
    print("do_bench medians of one eager call (launch costs included); speedup = native / eager triton")
    print(f"{'batch':>6} {'context':>8} {'splits':>6} {'graph_us':>9} {'floor_us':>9} {'GB/s':>7} "
          f"{'%floor':>7} {'eager_us':>9} {'native_us':>10} {'speedup':>8}")
    decode_rows = bench_decode(copy_rate)
    print("\n# paged prefill, one request, causal (dense SDPA on contiguous K/V for scale)")
    print(f"{'q_len':>6} {'prefix':>7} {'triton_us':>10} {'TFLOP/s':>8} {'sdpa_dense_us':>12}")
    prefill_rows = bench_prefill()
    print("\n# fused ops vs eager torch, Llama-3.1-8B shapes")
    print(f"{'op':18s} {'tokens':>6} {'fused_us':>9} {'torch_us':>9} {'speedup':>8}")
    op_rows = bench_ops()
    sweep_rows = sweep(copy_rate) if args.sweep else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": props.name, "copy_rate_tb_s": copy_rate / 1e12, "decode": decode_rows,
                       "prefill": prefill_rows, "ops": op_rows, "sweep": sweep_rows}, f, indent=1)


if __name__ == "__main__":
    main()
