"""`tokenmill bench moe`: the serving measurements of a mixture-of-experts model, one engine for all
of them (a 30B model loads once), then HF `generate()` in the same run.

1. Batch-1 decode (`--decode-input-len` in / `--decode-output-len` out): ms per output token
   beside its floor, the bytes one token must read (every weight but the embedding table, of the
   routed experts only the top-k chosen, the KV cache at the mean context) at the device copy rate
   measured in this run.
2. The `bench serve` load in process (`concurrency.closed_loop`): `--load-prompts` prompts of
   `--load-input-len` in / `--load-output-len` out, `--load-concurrency` in flight: mean TPOT.
3. Offline: `--offline-prompts` x `--offline-input-len` / `--offline-output-len`, output tokens/s.
4. HF `generate()` with its own random weights of the same config (two 30B copies do not fit one
   GPU) on `--hf-prompts` prompts of `--offline-input-len` in / `--hf-output-len` out at batch
   `--hf-prompts` (the full offline count takes HF far too long): output tokens/s and the ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.benchmarks.common import sync, weight_bytes_read, write_json
from tokenmill.benchmarks.concurrency import closed_loop, print_summary


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("moe", help="MoE serving set: decode vs its floor, concurrency load, offline vs HF",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decode-input-len", type=int, default=512)
    p.add_argument("--decode-output-len", type=int, default=256)
    p.add_argument("--load-prompts", type=int, default=100)
    p.add_argument("--load-input-len", type=int, default=2048)
    p.add_argument("--load-output-len", type=int, default=1024)
    p.add_argument("--load-concurrency", type=int, default=10)
    p.add_argument("--offline-prompts", type=int, default=256)
    p.add_argument("--offline-input-len", type=int, default=1024)
    p.add_argument("--offline-output-len", type=int, default=1024)
    p.add_argument("--hf-prompts", type=int, default=16, help="0: no HF baseline")
    p.add_argument("--hf-output-len", type=int, default=64)
    p.add_argument("--parts", default="decode,load,offline,hf")
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p


def kv_bytes_per_token(runner) -> int:
    """KV-cache bytes one token occupies across every layer (what attention reads per cached token)."""
    return sum(layer.kv_cache_bytes_per_block(1, runner.kv_cache_dtype) for layer in runner.attention_layers)


def decode_ms_per_token(llm, prompt: list[int], output_len: int) -> tuple[float, float]:
    """(ms per output token after the first, prefill seconds), best of three each."""
    from tokenmill import SamplingParams

    device = llm.engine.config.device

    def timed(max_tokens: int) -> float:
        sync(device)
        start = time.perf_counter()
        llm.generate([prompt], SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
        sync(device)
        return time.perf_counter() - start

    timed(4)
    prefill = min(timed(1) for _ in range(3))
    full = min(timed(output_len) for _ in range(3))
    return (full - prefill) / (output_len - 1) * 1000, prefill


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams
    from tokenmill.benchmarks.workloads import fixed_random_workload
    from tokenmill.config import EngineArgs

    parts = set(args.parts.split(","))
    llm = LLM(**vars(EngineArgs.from_cli_args(args)))
    config = llm.engine.config
    device = config.device
    vocab = config.model.vocab_size
    result = {"benchmark": "moe", "model": config.model.served_model_name, "device": str(device),
              "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "dtype": str(config.model.dtype).removeprefix("torch.")}
    table = []
    if "decode" in parts:
        runner = llm.engine.core.executor.driver_worker.runner
        prompt = fixed_random_workload(1, args.decode_input_len, args.decode_output_len, vocab).prompts[0]
        ms, prefill = decode_ms_per_token(llm, prompt, args.decode_output_len)
        mean_context = args.decode_input_len + args.decode_output_len / 2
        weights = weight_bytes_read(runner.model, 1)
        kv = kv_bytes_per_token(runner) * mean_context
        copy_gb_s = None
        if device.type == "cuda":
            from tokenmill.benchmarks.kernels.copy_bandwidth import copy_rate
            copy_gb_s = copy_rate(torch.cuda.current_device(), 2.0)
        floor_ms = (weights + kv) / (copy_gb_s * 1e9) * 1000 if copy_gb_s else None
        result["decode"] = {"ms_per_token": ms, "prefill_s": prefill, "weight_bytes": weights, "kv_bytes": kv,
                            "copy_gb_per_s": copy_gb_s, "floor_ms": floor_ms,
                            "ratio_to_floor": ms / floor_ms if floor_ms else None}
        print(f"batch-1 decode {args.decode_input_len} in / {args.decode_output_len} out: {ms:.2f} ms/token "
              f"(prefill {prefill * 1000:.0f} ms); reads {weights / 1e9:.2f} GB of weights (top-k experts only) "
              f"+ {kv / 1e6:.0f} MB of KV per token"
              + (f"; floor {floor_ms:.2f} ms at the {copy_gb_s:.0f} GB/s copy rate: {ms / floor_ms:.2f}x the floor"
                 if floor_ms else ""))
        table.append(("batch-1 decode ms/token", f"{ms:.2f}", f"floor {floor_ms:.2f}" if floor_ms else "-",
                      f"{ms / floor_ms:.2f}x" if floor_ms else "-"))
    if "load" in parts:
        work = fixed_random_workload(args.load_prompts, args.load_input_len, args.load_output_len, vocab, seed=1)
        closed_loop(llm, work.prompts[:2], 4, 2)  # warm-up
        summary = closed_loop(llm, work.prompts, args.load_output_len, args.load_concurrency)
        result["load"] = summary
        print_summary(f"load {args.load_input_len} in / {args.load_output_len} out", summary)
        table.append((f"load TPOT ms ({args.load_concurrency} in flight)", f"{summary['mean_tpot_ms']:.2f}",
                      "vLLM 13.18 (issue)", f"{summary['output_tok_per_s']:.0f} tok/s"))
    offline_tok_s = None
    if "offline" in parts:
        work = fixed_random_workload(args.offline_prompts, args.offline_input_len, args.offline_output_len, vocab,
                                     seed=2)
        params = SamplingParams(temperature=0, max_tokens=args.offline_output_len, ignore_eos=True)
        llm.generate(work.prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        sync(device)
        start = time.perf_counter()
        outs = llm.generate(work.prompts, params, use_tqdm=False)
        sync(device)
        elapsed = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        offline_tok_s = tokens / elapsed
        result["offline"] = {"prompts": args.offline_prompts, "seconds": elapsed, "output_tokens": tokens,
                             "output_tok_per_s": offline_tok_s}
        print(f"offline {args.offline_prompts} x {args.offline_input_len}/{args.offline_output_len}: "
              f"{tokens} tokens in {elapsed:.1f} s = {offline_tok_s:.0f} output tok/s")
        table.append(("offline output tok/s", f"{offline_tok_s:.0f}", "-", "-"))
    hf_config = config.model.hf_config
    llm.shutdown()
    if "hf" in parts and args.hf_prompts > 0:
        hf = hf_throughput(hf_config, config.model.dtype, device, args.hf_prompts, args.offline_input_len,
                           args.hf_output_len, vocab)
        result["hf"] = hf
        ratio = offline_tok_s / hf["output_tok_per_s"] if offline_tok_s else None
        result["offline_over_hf"] = ratio
        print(f"HF generate, own random weights, {args.hf_prompts} prompts x {args.offline_input_len}/"
              f"{args.hf_output_len} at batch {args.hf_prompts}: {hf['output_tok_per_s']:.1f} output tok/s"
              + (f"; tokenmill offline / HF = {ratio:.1f}x (HF at a smaller count: the full one takes it far "
                 f"too long)" if ratio else ""))
        table.append(("HF generate output tok/s", f"{hf['output_tok_per_s']:.1f}", f"{args.hf_prompts} prompts",
                      f"tokenmill {ratio:.1f}x" if ratio else "-"))
    print("\n| measurement | value | baseline | ratio |\n|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    write_json(args.output_json, result)
    return result


@torch.inference_mode()
def hf_throughput(hf_config, dtype: torch.dtype, device: torch.device, num_prompts: int, input_len: int,
                  output_len: int, vocab: int) -> dict:
    """HF `generate()` on random prompts at one batch, its own random weights."""
    from transformers import AutoModelForCausalLM

    from tokenmill.benchmarks.workloads import fixed_random_workload

    if device.type == "cuda":
        torch.cuda.empty_cache()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    prompts = torch.tensor(fixed_random_workload(num_prompts, input_len, output_len, vocab, seed=3).prompts,
                           device=device)
    pad = 0

    def generate(ids: torch.Tensor, n: int) -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=pad)

    generate(prompts[:1, :16], 2)  # warm-up
    sync(device)
    start = time.perf_counter()
    generate(prompts, output_len)
    sync(device)
    elapsed = time.perf_counter() - start
    del model
    return {"prompts": num_prompts, "input_len": input_len, "output_len": output_len, "seconds": elapsed,
            "output_tok_per_s": num_prompts * output_len / elapsed}
