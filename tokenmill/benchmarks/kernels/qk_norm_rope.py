"""Qwen3's attention prologue on the GPU: the per-head q and k RMSNorms, the rotation and the KV-cache
write as three kernels (`rms_norm` twice, then `rope_and_write_kv_cache`), against the one kernel
that does all of it (`rope_and_write_kv_cache` given the norm weights).

Per layer, at Qwen3-8B's heads (32 q / 8 kv, head_dim 128, bf16) and Qwen3-30B-A3B's (32 / 4):
each variant's calls for 48 layers' inputs replayed back to back from one CUDA graph (`graph_us`),
at 1 token (batch-1 decode) and 256 (a prefill chunk), with and without programmatic dependent
launch where the GPU has it. Also prints the rotation + write alone (the kernel without norms) and
checks that the fused kernel leaves what the three leave, bit for bit. Prints; asserts nothing
about time.

Usage: python3 -m tokenmill.benchmarks.kernels.qk_norm_rope [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import torch

from tokenmill.benchmarks.kernels.attention_kernels import graph_us
from tokenmill.ops import pdl as pdl_ops
from tokenmill.ops.kv_cache_write import rope_and_write_kv_cache
from tokenmill.ops.rms_norm import rms_norm

DEVICE = torch.device("cuda")
HEAD_DIM, LAYERS, EPS, MAX_POSITION = 128, 48, 1e-6, 4096


def layer_inputs(num_tokens: int, heads: int, kv_heads: int) -> dict:
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * HEAD_DIM, dtype=torch.bfloat16, device=DEVICE)
    q, k, v = qkv.split([heads * HEAD_DIM, kv_heads * HEAD_DIM, kv_heads * HEAD_DIM], 1)
    cache_shape = (num_tokens // 16 + 1, 16, kv_heads, HEAD_DIM)
    return dict(
        q=q.view(num_tokens, heads, HEAD_DIM), k=k.view(num_tokens, kv_heads, HEAD_DIM),
        v=v.view(num_tokens, kv_heads, HEAD_DIM),
        k_cache=torch.zeros(cache_shape, dtype=torch.bfloat16, device=DEVICE),
        v_cache=torch.zeros(cache_shape, dtype=torch.bfloat16, device=DEVICE),
        slots=torch.arange(num_tokens, device=DEVICE),
        positions=torch.randint(0, MAX_POSITION, (num_tokens,), device=DEVICE),
        q_weight=torch.rand(HEAD_DIM, dtype=torch.bfloat16, device=DEVICE) + 0.5,
        k_weight=torch.rand(HEAD_DIM, dtype=torch.bfloat16, device=DEVICE) + 0.5,
    )


def three_kernels(x: dict, cos_sin: torch.Tensor, pdl: bool) -> None:
    q = rms_norm(x["q"], x["q_weight"], EPS, pdl=pdl)
    k = rms_norm(x["k"], x["k_weight"], EPS, pdl=pdl)
    rope_and_write_kv_cache(q, k, x["v"], x["k_cache"], x["v_cache"], x["slots"], x["positions"], cos_sin, pdl=pdl)


def fused(x: dict, cos_sin: torch.Tensor, pdl: bool) -> None:
    rope_and_write_kv_cache(x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["slots"], x["positions"],
                            cos_sin, pdl=pdl, q_norm_weight=x["q_weight"], k_norm_weight=x["k_weight"],
                            qk_norm_eps=EPS)


def rope_write_alone(x: dict, cos_sin: torch.Tensor, pdl: bool) -> None:
    rope_and_write_kv_cache(x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["slots"], x["positions"],
                            cos_sin, pdl=pdl)


def bit_identical(x: dict, cos_sin: torch.Tensor) -> bool:
    """The fused kernel on copies against the three kernels on other copies."""
    a = {n: t.clone() for n, t in x.items()}
    b = {n: t.clone() for n, t in x.items()}
    q = rms_norm(a["q"], a["q_weight"], EPS)
    k = rms_norm(a["k"], a["k_weight"], EPS)
    rope_and_write_kv_cache(q, k, a["v"], a["k_cache"], a["v_cache"], a["slots"], a["positions"], cos_sin)
    fused(b, cos_sin, pdl=False)
    return (torch.equal(q, b["q"]) and torch.equal(k, b["k"]) and torch.equal(a["k_cache"], b["k_cache"])
            and torch.equal(a["v_cache"], b["v_cache"]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    cos_sin = torch.randn(MAX_POSITION, HEAD_DIM, device=DEVICE)
    pdl_modes = (False, True) if pdl_ops.supported(DEVICE) else (False,)
    print(f"device: {torch.cuda.get_device_name()}; per layer, us (graph replay of {LAYERS} layers' calls)")
    print(f"{'model':14s} {'tokens':>6} {'pdl':>3} {'3 kernels':>10} {'fused':>7} {'rope+write alone':>17} "
          f"{'bit-identical':>14}")
    rows = []
    for model, heads, kv_heads in (("qwen3-8b", 32, 8), ("qwen3-30b-a3b", 32, 4)):
        for num_tokens in (1, 256):
            layers = [layer_inputs(num_tokens, heads, kv_heads) for _ in range(LAYERS)]
            same = bit_identical(layers[0], cos_sin)
            for pdl in pdl_modes:
                times = {name: graph_us([lambda x=x, op=op: op(x, cos_sin, pdl) for x in layers])
                         for name, op in (("three_kernels_us", three_kernels), ("fused_us", fused),
                                          ("rope_write_alone_us", rope_write_alone))}
                rows.append({"model": model, "num_tokens": num_tokens, "pdl": pdl, "bit_identical": same, **times})
                print(f"{model:14s} {num_tokens:6d} {int(pdl):3d} {times['three_kernels_us']:10.2f} "
                      f"{times['fused_us']:7.2f} {times['rope_write_alone_us']:17.2f} {str(same):>14}", flush=True)
            del layers
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
