"""Batch-1 decode's attention kernels, one layer at a time, as a decode graph runs them: the paged
decode kernel at several contexts (split count that of a graph captured for `--max-model-len`),
and Qwen3's prologue (`rope_and_write_kv_cache` with the q/k norms). Each is a CUDA graph of
back-to-back calls over 48 layers' distinct inputs, launched dependent where the GPU has it;
the median per call. Shapes: Qwen3-30B-A3B (32 query / 4 KV heads) and Llama-3.1-8B (32 / 8),
head_dim 128, bf16, block size 16. Prints; asserts nothing about time.

It imports only modules every recent tree has, so it times another commit's kernels when run
as a file with that tree first on the path:

    python3 -m tokenmill.benchmarks.kernels.batch1_attention [--json this.json]
    PYTHONPATH=<tree holding another tokenmill/> python3 tokenmill/benchmarks/kernels/batch1_attention.py
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from tokenmill.benchmarks.kernels.attention_kernels import graph_us
from tokenmill.ops import pdl as pdl_ops
from tokenmill.ops.attention_decode import decode_num_splits, new_split_counters, paged_decode
from tokenmill.ops.kv_cache_write import rope_and_write_kv_cache

DEVICE = torch.device("cuda")
HEAD_DIM, BLOCK_SIZE, LAYERS, DTYPE = 128, 16, 48, torch.bfloat16
SHAPES = {"qwen3-30b-a3b": (32, 4), "llama-3.1-8b": (32, 8)}
CONTEXTS = (320, 512, 600, 768, 1000, 1500, 2000, 3000, 4000)


def decode_calls(heads: int, kv_heads: int, context: int, max_model_len: int, dependent: bool) -> list:
    blocks = math.ceil(context / BLOCK_SIZE)
    splits = decode_num_splits(1, kv_heads, max_model_len, DEVICE)
    counters = new_split_counters(kv_heads, DEVICE)
    calls = []
    for _ in range(LAYERS):
        shape = (blocks, BLOCK_SIZE, kv_heads, HEAD_DIM)
        k_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE)
        v_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE)
        block_table = torch.randperm(blocks, dtype=torch.int32, device=DEVICE)[None, :]
        seq_lens = torch.full((1,), context, dtype=torch.int32, device=DEVICE)
        q = torch.randn(1, heads, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        out = torch.empty_like(q)
        calls.append(lambda q=q, k=k_cache, v=v_cache, bt=block_table, sl=seq_lens, out=out: paged_decode(
            q, k, v, bt, sl, out, max_model_len, HEAD_DIM ** -0.5, num_splits=splits, split_counters=counters,
            pdl=dependent))
    return calls


def prologue_calls(heads: int, kv_heads: int, dependent: bool) -> list:
    calls = []
    cos_sin = torch.randn(4096, HEAD_DIM, device=DEVICE)
    positions = torch.tensor([777], device=DEVICE)
    for layer in range(LAYERS):
        qkv = torch.randn(1, (heads + 2 * kv_heads) * HEAD_DIM, dtype=DTYPE, device=DEVICE)
        q, k, v = qkv.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], 1)
        cache = [torch.zeros(64, BLOCK_SIZE, kv_heads, HEAD_DIM, dtype=DTYPE, device=DEVICE) for _ in range(2)]
        norms = [torch.rand(HEAD_DIM, dtype=DTYPE, device=DEVICE) + 0.5 for _ in range(2)]
        slot = torch.tensor([layer], device=DEVICE)
        calls.append(lambda q=q.view(1, heads, HEAD_DIM), k=k.view(1, kv_heads, HEAD_DIM),
                     v=v.view(1, kv_heads, HEAD_DIM), cache=cache, norms=norms, slot=slot: rope_and_write_kv_cache(
            q, k, v, cache[0], cache[1], slot, positions, cos_sin, pdl=dependent, q_norm_weight=norms[0],
            k_norm_weight=norms[1]))
    return calls


def block_calls(heads: int, kv_heads: int, context: int, count: int, dependent: bool, options: dict | None = None,
                max_model_len: int = 4096, hidden: int = 2048) -> tuple[list, list[torch.Tensor], list[torch.Tensor]]:
    """`count` distinct layers' attention block up to the O projection, as a decode graph runs it:
    the QKV GEMV with the input norm fused, rope + q/k norms + KV write, the paged decode at
    `context` tokens. The calls, each one's output row [1, heads * HEAD_DIM] (the O GEMV's input)
    and its QKV weight. `options`, read at each call (so one set of layers serves several graphs):
    "attention_prefetch", a tensor per layer the attention asks L2 for (`ops/l2_prefetch.py`;
    passed only when set, so a tree without it runs its default)."""
    from tokenmill.ops.gemv import rms_norm_gemv

    options = options if options is not None else {}
    width = (heads + 2 * kv_heads) * HEAD_DIM
    blocks = math.ceil(context / BLOCK_SIZE) + 1
    splits = decode_num_splits(1, kv_heads, max_model_len, DEVICE)
    counters = new_split_counters(kv_heads, DEVICE)
    cos_sin = torch.randn(max_model_len, HEAD_DIM, device=DEVICE)
    positions = torch.tensor([context - 1], device=DEVICE)
    seq_lens = torch.full((1,), context, dtype=torch.int32, device=DEVICE)
    slot = torch.tensor([context - 1], device=DEVICE)
    calls, outs, qkv_weights = [], [], []
    for layer in range(count):
        x = torch.randn(1, hidden, dtype=DTYPE, device=DEVICE)
        residual = torch.randn(1, hidden, dtype=DTYPE, device=DEVICE)
        norm_w = torch.rand(hidden, dtype=DTYPE, device=DEVICE) + 0.5
        w_qkv = torch.randn(width, hidden, dtype=DTYPE, device=DEVICE) * 0.02
        shape = (blocks, BLOCK_SIZE, kv_heads, HEAD_DIM)
        k_cache, v_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE), torch.randn(shape, dtype=DTYPE, device=DEVICE)
        block_table = torch.arange(blocks, dtype=torch.int32, device=DEVICE)[None, :]
        qk_norms = [torch.rand(HEAD_DIM, dtype=DTYPE, device=DEVICE) + 0.5 for _ in range(2)]
        out = torch.empty(1, heads, HEAD_DIM, dtype=DTYPE, device=DEVICE)

        def call(layer=layer, x=x, residual=residual, norm_w=norm_w, w_qkv=w_qkv, k_cache=k_cache, v_cache=v_cache,
                 block_table=block_table, qk_norms=qk_norms, out=out):
            prefetch = options.get("attention_prefetch")
            attention_extra = {"prefetch": prefetch[layer]} if prefetch else {}
            qkv, _ = rms_norm_gemv(x, norm_w, 1e-6, w_qkv, residual, pdl=dependent)
            q, k, v = qkv.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], 1)
            q = q.view(1, heads, HEAD_DIM)
            rope_and_write_kv_cache(q, k.view(1, kv_heads, HEAD_DIM), v.view(1, kv_heads, HEAD_DIM), k_cache,
                                    v_cache, slot, positions, cos_sin, pdl=dependent, q_norm_weight=qk_norms[0],
                                    k_norm_weight=qk_norms[1])
            paged_decode(q, k_cache, v_cache, block_table, seq_lens, out, max_model_len, HEAD_DIM ** -0.5,
                         num_splits=splits, split_counters=counters, pdl=dependent, **attention_extra)
        calls.append(call)
        outs.append(out.view(1, heads * HEAD_DIM))
        qkv_weights.append(w_qkv)
    return calls, outs, qkv_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    dependent = pdl_ops.supported(DEVICE)
    print(f"{torch.cuda.get_device_name()}; graphs for {args.max_model_len} tokens; dependent launches: {dependent}")
    result = {"device": torch.cuda.get_device_name(), "max_model_len": args.max_model_len, "rows": []}
    for name, (heads, kv_heads) in SHAPES.items():
        prologue = graph_us(prologue_calls(heads, kv_heads, dependent))
        print(f"{name}: q/k norm + rope + KV write {prologue:.2f} us", flush=True)
        result["rows"].append({"shape": name, "op": "qk_norm_rope_write", "us": prologue})
        for context in CONTEXTS:
            us = graph_us(decode_calls(heads, kv_heads, context, args.max_model_len, dependent))
            print(f"{name}: paged decode at {context:5d} tokens {us:6.2f} us", flush=True)
            result["rows"].append({"shape": name, "op": "paged_decode", "context": context, "us": us})
            torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
