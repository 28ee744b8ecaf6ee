"""`tokenmill bench latency`: batch-1 (or small-batch) decode latency in ms per output token, with
the bytes-of-weights floor, and HF `generate()` on the same prompt beside it."""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.benchmarks.common import sync, weight_bytes_read, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("latency", help="decode latency (ms/token) vs HF generate()")
    p.add_argument("--batch-size", type=int, default=1, help="requests decoded together")
    p.add_argument("--input-len", type=int, default=512, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=256, help="tokens generated per request")
    p.add_argument("--num-iters", type=int, default=3, help="timed runs of each measurement; the fastest is reported")
    p.add_argument("--baseline", choices=("hf", "none"), default="hf",
                   help="hf: run HF transformers generate() on the same prompt beside tokenmill")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both tokenmill and the baseline (default: the cores not "
                        "busy with other work, tokenmill/entrypoints/threads.py)")
    p.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams
    from tokenmill.benchmarks.workloads import fixed_random_workload
    from tokenmill.config import EngineArgs

    llm = LLM(**vars(EngineArgs.from_cli_args(args)), engine_threads=args.threads)
    config = llm.engine.config
    device = config.device
    work = fixed_random_workload(args.batch_size, args.input_len, args.output_len, config.model.vocab_size)
    hf_model = None
    if args.baseline == "hf":
        from tokenmill.benchmarks.hf_baseline import load_hf_model
        hf_model, _ = load_hf_model(llm)  # first: dummy weights are copied from HF into tokenmill

    def timed(max_tokens: int) -> float:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        sync(device)
        start = time.perf_counter()
        llm.generate(work.prompts, params, use_tqdm=False)
        sync(device)
        return time.perf_counter() - start

    timed(4)  # warm-up
    prefill = min(timed(1) for _ in range(args.num_iters))
    full = min(timed(args.output_len) for _ in range(args.num_iters))
    ms_per_token = (full - prefill) / (args.output_len - 1) * 1000
    # Rank 0's shard: per GPU; of a mixture of experts, the experts the batch's tokens chose.
    weight_bytes = weight_bytes_read(llm.engine.core.executor.driver_worker.model, args.batch_size)
    result = {
        "benchmark": "latency", "model": config.model.served_model_name, "device": str(device),
        "dtype": str(config.model.dtype).removeprefix("torch."), "batch_size": args.batch_size,
        "input_len": args.input_len, "output_len": args.output_len,
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
        "async_scheduling": config.scheduler.async_scheduling,
        "tokenmill": {"prefill_s": prefill, "total_s": full, "ms_per_token": ms_per_token,
                      "weight_gb_per_s": weight_bytes / (ms_per_token / 1000) / 1e9},
        "weight_bytes": weight_bytes,
    }
    print(f"tokenmill: {ms_per_token:.2f} ms/token decode (batch {args.batch_size}), prefill {prefill * 1000:.1f} ms, "
          f"{result['tokenmill']['weight_gb_per_s']:.0f} GB/s of weights"
          + (f" per GPU (TP={config.parallel.tensor_parallel_size})" if config.parallel.tensor_parallel_size > 1 else ""))
    if hf_model is not None:
        model = hf_model
        llm.engine.core.shutdown()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ids = torch.tensor(work.prompts, device=device)

        @torch.inference_mode()
        def hf_timed(n: int) -> float:
            sync(device)
            start = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)
            sync(device)
            return time.perf_counter() - start

        hf_timed(2)
        hf_prefill = hf_timed(1)
        hf_full = hf_timed(args.output_len)
        hf_ms = (hf_full - hf_prefill) / (args.output_len - 1) * 1000
        result["hf"] = {"prefill_s": hf_prefill, "total_s": hf_full, "ms_per_token": hf_ms}
        result["speedup"] = hf_ms / ms_per_token
        print(f"HF generate: {hf_ms:.2f} ms/token; tokenmill is {result['speedup']:.2f}x faster")
    write_json(args.output_json, result)
    return result

