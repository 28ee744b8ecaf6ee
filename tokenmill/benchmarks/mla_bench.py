"""Multi-head latent attention at a real shape (default DeepSeek-V2-Lite, dummy bf16 weights), on
one engine, each figure beside its baseline:

- KV cache bytes per token: the latent cache against the same model with its attention expanded
  to MHA (every head's 192-wide key and 128-wide value cached); also for the other shipped MLA
  shapes, from their configs.
- the largest batch whose requests each hold `--context` tokens, from the KV pool the engine
  derives (`gpu_memory_utilization`), for both cache forms;
- batch-1 decode latency (`--latency-input-len` in, `--latency-output-len` out, as `bench
  latency`) against the floor: the bytes a decode step reads (attention, dense and shared weights,
  the routed top-k experts: `common.weight_bytes_read`; the context's latents) at the copy rate
  measured in the same run;
- offline throughput of `--num-prompts` x `--input-len` / `--output-len` random prompts (as
  `bench throughput --workload random`).

    python3 -m tokenmill.benchmarks.mla_bench [--model deepseek-v2-lite] [--output-json PATH]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from tokenmill.benchmarks.common import sync, weight_bytes_read, write_json

MLA_SHAPES = ("deepseek-v2-lite", "moonlight-16b-a3b", "deepseek-v3", "kimi-k2")


def kv_bytes_per_token(hf_config: Any, element_size: int) -> tuple[int, int]:
    """(latent cache, expanded-MHA cache) bytes per token over all layers of an MLA config."""
    c = hf_config
    latent = c.kv_lora_rank + c.qk_rope_head_dim
    mha = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim)
    return c.num_hidden_layers * latent * element_size, c.num_hidden_layers * mha * element_size


def _host_copy_rate(n: int = 1 << 28) -> float:
    src, dst = torch.empty(n, dtype=torch.uint8), torch.empty(n, dtype=torch.uint8)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * n / best / 1e9


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deepseek-v2-lite")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=1024)
    p.add_argument("--latency-input-len", type=int, default=512)
    p.add_argument("--latency-output-len", type=int, default=256)
    p.add_argument("--context", type=int, default=2048, help="tokens a request holds, for the largest batch")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()

    from tokenmill import LLM, SamplingParams
    from tokenmill.benchmarks.kernels.copy_bandwidth import copy_rate
    from tokenmill.benchmarks.workloads import fixed_random_workload
    from tokenmill.config.model_source import resolve_model_source

    # Before the engine takes the memory. (On a CPU, for a smoke run: the host's copy rate.)
    copy_gb_per_s = copy_rate(0, 4.0) if torch.cuda.is_available() else _host_copy_rate()
    max_len = max(args.context, args.input_len + args.output_len, args.latency_input_len + args.latency_output_len)
    started = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", dtype="bfloat16", max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, gpu_memory_utilization=args.gpu_memory_utilization,
              kv_cache_dtype=args.kv_cache_dtype)
    start_s = time.perf_counter() - started
    config = llm.engine.config
    device = config.device
    runner = llm.engine.core.executor.driver_worker.runner
    hf_config = config.model.hf_config
    element = torch.empty((), dtype=runner.kv_cache_dtype).element_size()

    # ----- KV cache: bytes per token and the largest batch at --context tokens -----
    block_size = config.cache.block_size
    mla_per_token = runner.kv_cache_bytes_per_block() // block_size
    expected, mha_per_token = kv_bytes_per_token(hf_config, element)
    assert mla_per_token == expected, (mla_per_token, expected)
    pool_bytes = llm.engine.core.kv_capacity_tokens * mla_per_token
    blocks_per_request = -(-args.context // block_size)
    mla_batch = llm.engine.core.kv_capacity_tokens // block_size // blocks_per_request
    mha_batch = int(pool_bytes // (mha_per_token * block_size)) // blocks_per_request
    shapes = {}
    for name in MLA_SHAPES:
        shape_config = resolve_model_source(name, "dummy").load_hf_config()
        latent, mha = kv_bytes_per_token(shape_config, 2)
        shapes[name] = {"latent_bytes_per_token": latent, "mha_bytes_per_token": mha, "ratio": mha / latent}

    # ----- batch-1 decode against the bytes-read floor -----
    work = fixed_random_workload(1, args.latency_input_len, args.latency_output_len, config.model.vocab_size)

    def timed(prompts, max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        sync(device)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        sync(device)
        return time.perf_counter() - start

    timed(work.prompts, 4)  # warm-up
    prefill = min(timed(work.prompts, 1) for _ in range(3))
    full = min(timed(work.prompts, args.latency_output_len) for _ in range(3))
    ms_per_token = (full - prefill) / (args.latency_output_len - 1) * 1000
    mean_context = args.latency_input_len + args.latency_output_len // 2
    weight_bytes = weight_bytes_read(runner.model, 1)
    floor_bytes = weight_bytes + mla_per_token * mean_context
    floor_ms = floor_bytes / (copy_gb_per_s * 1e9) * 1000

    # ----- offline throughput -----
    tput = fixed_random_workload(args.num_prompts, args.input_len, args.output_len, config.model.vocab_size)
    timed(tput.prompts[:2], 4)
    elapsed = timed(tput.prompts, args.output_len)
    out_tok_per_s = args.num_prompts * args.output_len / elapsed

    result = {
        "benchmark": "mla", "model": args.model, "device": torch.cuda.get_device_name(0) if device.type == "cuda"
        else "cpu", "engine_start_s": start_s, "copy_gb_per_s": copy_gb_per_s,
        "kv": {"latent_bytes_per_token": mla_per_token, "mha_bytes_per_token": mha_per_token,
               "ratio": mha_per_token / mla_per_token, "pool_bytes": pool_bytes, "context": args.context,
               "max_batch_latent": mla_batch, "max_batch_mha": mha_batch, "shapes": shapes},
        "batch1": {"input_len": args.latency_input_len, "output_len": args.latency_output_len,
                   "ms_per_token": ms_per_token, "floor_ms": floor_ms, "ratio_to_floor": ms_per_token / floor_ms,
                   "bytes_per_token": floor_bytes, "weight_bytes_per_token": weight_bytes},
        "throughput": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                       "seconds": elapsed, "output_tok_per_s": out_tok_per_s},
    }
    write_json(args.output_json, result)
    kv = result["kv"]
    print(f"\n{args.model} on {result['device']}: copy rate {copy_gb_per_s:.0f} GB/s, engine start {start_s:.0f} s")
    print(f"{'KV bytes/token (all layers)':<44} latent {mla_per_token:>9,}   MHA form {mha_per_token:>9,}   "
          f"MHA/latent {kv['ratio']:.1f}x")
    for name, s in shapes.items():
        print(f"  {name:<42} latent {s['latent_bytes_per_token']:>9,}   MHA form {s['mha_bytes_per_token']:>9,}   "
              f"MHA/latent {s['ratio']:.1f}x")
    print(f"{f'largest batch at {args.context} tokens':<44} latent {mla_batch:>9,}   MHA form {mha_batch:>9,}   "
          f"(KV pool {pool_bytes / 2**30:.1f} GiB)")
    print(f"{'batch-1 decode ms/token':<44} measured {ms_per_token:>7.2f}   floor {floor_ms:>7.2f}   "
          f"ratio {ms_per_token / floor_ms:.2f}x ({floor_bytes / 1e9:.2f} GB/token)")
    print(f"{f'offline {args.num_prompts} x {args.input_len}/{args.output_len}':<44} "
          f"{out_tok_per_s:>9.0f} output tok/s ({elapsed:.1f} s)")


if __name__ == "__main__":
    main()
