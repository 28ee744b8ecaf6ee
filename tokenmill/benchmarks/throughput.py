"""`tokenmill bench throughput`: offline generation throughput, with HF `generate()` beside it.

Defaults reproduce the CPU benchmark of docs/perf.md: the embedded model, 32 prompts x 128 new
tokens, against HF at batch 32 in the same dtype in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch

from tokenmill.benchmarks.common import sync, write_json


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("throughput", help="offline throughput (output tokens/s) vs HF generate()")
    p.add_argument("--workload", choices=("text", "random", "nanovllm"), default=None,
                   help="text: built-in prompts (default with a tokenizer); random: token ids of "
                        "--input-len; nanovllm: the nano-vllm benchmark exactly")
    p.add_argument("--num-prompts", type=int, default=32, help="prompts in the batch")
    p.add_argument("--input-len", type=int, default=256,
                   help="prompt tokens each (random workload)")
    p.add_argument("--output-len", type=int, default=128, help="tokens generated per prompt")
    p.add_argument("--baseline", choices=("hf", "none"), default="hf",
                   help="hf: run HF transformers generate() on the same work beside tokenmill")
    p.add_argument("--hf-batch-size", type=int, default=32, help="prompts per HF generate() call")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for both tokenmill and the baseline (default: the cores not "
                        "busy with other work, tokenmill/entrypoints/threads.py)")
    p.add_argument("--output-json", default=None, help="also write the results to this JSON file")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams
    from tokenmill.benchmarks.workloads import fixed_random_workload, nanovllm_workload, text_workload
    from tokenmill.config import EngineArgs

    engine_args = EngineArgs.from_cli_args(args)
    if args.workload == "nanovllm" and args.max_model_len is None:
        engine_args.max_model_len = 4096
    llm = LLM(**vars(engine_args), engine_threads=args.threads)  # sets torch's threads for HF too
    config = llm.engine.config
    workload_name = args.workload or ("text" if llm.engine.tokenizer is not None else "random")
    if workload_name == "text":
        work = text_workload(args.num_prompts, args.output_len)
    elif workload_name == "random":
        work = fixed_random_workload(args.num_prompts, args.input_len, args.output_len, config.model.vocab_size)
    else:
        work = nanovllm_workload()
    params = [SamplingParams(temperature=work.temperature, ignore_eos=work.ignore_eos, max_tokens=n)
              for n in work.output_lens]
    hf_model = hf_tokenizer = None
    if args.baseline == "hf":
        # Loaded first: with dummy weights HF's random weights are copied into tokenmill's model,
        # so both time the very same numbers.
        from tokenmill.benchmarks.hf_baseline import load_hf_model
        hf_model, hf_tokenizer = load_hf_model(llm)

    # Warm-up on a few prompts so one-time costs stay out of the numbers.
    llm.generate(work.prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2, use_tqdm=False)
    sync(config.device)
    start = time.perf_counter()
    outputs = llm.generate(work.prompts, params, use_tqdm=False)
    sync(config.device)
    elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    in_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    result = {
        "benchmark": "throughput", "workload": work.name, "model": config.model.served_model_name,
        "dtype": str(config.model.dtype).removeprefix("torch."), "device": str(config.device),
        "num_prompts": len(work.prompts), "input_tokens": in_tokens, "threads": torch.get_num_threads(),
        "tensor_parallel_size": config.parallel.tensor_parallel_size,
        "async_scheduling": config.scheduler.async_scheduling,
        "tokenmill": {"output_tokens": out_tokens, "seconds": elapsed, "output_tok_per_s": out_tokens / elapsed,
                      "total_tok_per_s": (in_tokens + out_tokens) / elapsed},
    }
    print(f"tokenmill: {out_tokens} output tokens in {elapsed:.2f}s = {out_tokens / elapsed:.1f} tok/s "
          f"({workload_name}, {len(work.prompts)} prompts, {result['dtype']}, {config.device})")
    if hf_model is not None:
        from tokenmill.benchmarks.hf_baseline import hf_generate_throughput
        model, tokenizer = hf_model, hf_tokenizer
        llm.engine.core.shutdown()  # give the KV pool's memory to the baseline
        if config.device.type == "cuda":
            torch.cuda.empty_cache()
        if work.name == "nanovllm":
            print("note: HF runs the nanovllm prompts greedy with the mean output length")
        hf_generate_throughput(model, tokenizer, work.prompts[:2], 4, 2, config.device)  # warm-up
        out_len = round(sum(work.output_lens) / len(work.output_lens))
        hf = hf_generate_throughput(model, tokenizer, work.prompts, out_len, args.hf_batch_size, config.device)
        result["hf"] = hf
        result["ratio"] = result["tokenmill"]["output_tok_per_s"] / hf["output_tok_per_s"]
        print(f"HF generate (batch {args.hf_batch_size}): {hf['output_tokens']} output tokens in "
              f"{hf['seconds']:.2f}s = {hf['output_tok_per_s']:.1f} tok/s")
        print(f"ratio tokenmill / HF = {result['ratio']:.2f}x")
    write_json(args.output_json, result)
    return result

