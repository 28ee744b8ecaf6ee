"""Host (Python) cost of one engine step at large batch, on a model whose compute is negligible.

A 1-layer, hidden-64 Qwen3-shaped model with dummy weights and a synthetic byte-level BPE tokenizer
of the same vocabulary, so detokenization runs through `tokenizers`' DecodeStream as it does for a
real model. `--batch` token-id prompts of `--input-len` tokens generate `--max-tokens` tokens each
with `ignore_eos`. Each `LLMEngine.step()` is timed, split by phase with `time.perf_counter` (or,
with `--clock thread`, `time.thread_time`) wrappers around the engine's own methods (nothing in the
engine is changed), and the time spent in Python's cyclic garbage collector is counted through
`gc.callbacks`. The table reports decode-only steps at full batch: medians show the typical step,
means include the GC pauses.

The default vocabulary is 4,096. With Qwen3's 151,936 (`--vocab-size 151936`) this CPU spends
~60 ms of each step in the LM head and the sampler's argmax over 39M logits, and the allocator maps
and unmaps the 155 MB logits tensor every step (~15 ms, charged to the runner's remainder): GPU work
and a CPU-allocator artifact that bury the few ms of Python being measured. The Python phases read
the same at either size.

    python -m tokenmill.benchmarks.host_overhead                      # batch 256, 256 in / 128 out, greedy
    python -m tokenmill.benchmarks.host_overhead --output-kind delta --logprobs 5   # what a streaming server pays
    python -m tokenmill.benchmarks.host_overhead --temperature 0.6    # random sampling path
    python -m tokenmill.benchmarks.host_overhead --gc-freeze          # gc.freeze() once the engine is built
    python -m tokenmill.benchmarks.host_overhead --profile            # plus cProfile of the decode steps
    python -m tokenmill.benchmarks.host_overhead --shape qwen3-0.6b --device cuda --dtype bfloat16   # on a GPU

On a GPU the decode steps replay CUDA graphs (no forward hook fires): the graph's GPU time shows in
the sampler's row, which waits for the sampled tokens.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import os
import pstats
import random
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Callable

import torch

from tokenmill.config.sampling_args import add_sampling_args, sampling_params_from_args

# Phases in display order; "other" rows are the parent's time minus its timed children.
PHASES = [
    ("schedule", "Scheduler.schedule"),
    ("apply_diffs", "runner: apply scheduler diffs"),
    ("prepare_inputs", "runner: host inputs + to device"),
    ("forward", "runner: model forward (compute)"),
    ("lm_head", "runner: LM head (compute)"),
    ("sampling_batch", "runner: build SamplingBatch"),
    ("sampler", "Sampler (vocab-wide ops + Python)"),
    ("runner_other", "runner: order, rows, per-row loop"),
    ("update", "Scheduler.update"),
    ("core_other", "core: stats, EngineOutputs"),
    ("output", "OutputProcessor.process (detok)"),
]
# Reported beside the phases (it happens inside them): the cyclic GC's pauses.
GC = ("gc", "  of which: cyclic GC pauses")
COMPUTE = ("forward", "lm_head")


def write_tiny_model(folder: str, vocab_size: int, max_len: int, shape: str | None = None) -> int:
    """A Qwen3-shaped config (1 layer, hidden 64; or a shipped shape's real config) and a byte-level
    BPE tokenizer of its vocabulary. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenmill.config.model_source import CONFIGS_DIR

    if shape is not None:
        with open(CONFIGS_DIR / f"{shape}.json") as f:
            config = json.load(f)
        vocab_size = config["vocab_size"]
    else:
        config = {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": vocab_size,
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": max_len,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000, "tie_word_embeddings": True, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
        }
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    # Byte-level alphabet first (ids 3..258), then word-like pieces with a leading space marker.
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in byte_chars:
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"\u0120w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.save_pretrained(folder)
    return vocab_size


class PhaseTimer:
    """Accumulates time per phase for the current step, on `clock` (wall or this thread's CPU)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.current: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable) -> Callable:
        current, clock = self.current, self.clock

        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                current[name] += clock() - start
        return timed

    def gc_callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_start = self.clock()
        else:
            self.current["gc"] += self.clock() - self._gc_start

    def take(self) -> dict[str, float]:
        step = dict(self.current)
        self.current.clear()
        return step


def instrument(engine, timer: PhaseTimer) -> dict:
    """Wrap the engine's stage methods (instance attributes shadow the class methods)."""
    core, runner, sched = engine.core, engine.core.executor.driver_worker.runner, engine.core.scheduler
    info: dict = {}
    schedule = sched.schedule

    def schedule_and_record():
        out = schedule()
        info["num_reqs"] = len(out.num_scheduled_tokens)
        info["num_tokens"] = out.total_num_scheduled_tokens
        return out

    sched.schedule = timer.wrap("schedule", schedule_and_record)
    sched.update = timer.wrap("update", sched.update)
    runner._apply_diffs = timer.wrap("apply_diffs", runner._apply_diffs)
    runner.input_batch.prepare = timer.wrap("prepare_inputs", runner.input_batch.prepare)
    runner.buffers.stage = timer.wrap("prepare_inputs", runner.buffers.stage)
    runner._sampling_batch = timer.wrap("sampling_batch", runner._sampling_batch)
    runner.sampler.sample = timer.wrap("sampler", runner.sampler.sample)
    runner.model.compute_logits = timer.wrap("lm_head", runner.model.compute_logits)
    start: list[float] = []
    runner.model.register_forward_pre_hook(lambda *_: start.append(timer.clock()))
    runner.model.register_forward_hook(
        lambda *_: timer.current.__setitem__("forward", timer.current["forward"] + timer.clock() - start.pop()))
    # "execute": launching a step (with async scheduling its tokens are read later, in core_other).
    runner.launch = timer.wrap("execute", runner.launch)
    core.step = timer.wrap("core_step", core.step)
    engine.output_processor.process = timer.wrap("output", engine.output_processor.process)
    return info


def derive(step: dict[str, float], total: float) -> dict[str, float]:
    """Per-phase ms of one step, with the parents' untimed remainders."""
    ms = {k: v * 1e3 for k, v in step.items()}
    runner_children = ("apply_diffs", "prepare_inputs", "forward", "lm_head", "sampling_batch", "sampler")
    ms["runner_other"] = ms.get("execute", 0.0) - sum(ms.get(k, 0.0) for k in runner_children)
    ms["core_other"] = ms.get("core_step", 0.0) - sum(ms.get(k, 0.0) for k in ("schedule", "execute", "update"))
    ms["step"] = total * 1e3
    ms["host"] = ms["step"] - sum(ms.get(k, 0.0) for k in COMPUTE)
    return ms


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM
    from tokenmill.sampling_params import RequestOutputKind

    torch.set_num_threads(args.threads)
    max_len = args.input_len + args.max_tokens + 16
    with tempfile.TemporaryDirectory() as folder:
        vocab_size = write_tiny_model(folder, args.vocab_size, max_len, args.shape)
        llm = LLM(folder, load_format="dummy", dtype=args.dtype, device=args.device, max_num_seqs=args.batch,
                  max_model_len=max_len, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
                  async_scheduling=args.async_scheduling)
    engine = llm.engine
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    rng = random.Random(0)
    # FINAL_ONLY is what `LLM.generate` asks for; the server streams DELTA.
    params = sampling_params_from_args(args, ignore_eos=True, logprobs=args.logprobs,
                                       output_kind=RequestOutputKind[args.output_kind.upper()])
    for i in range(args.batch):
        engine.add_request(str(i), [rng.randrange(259, vocab_size) for _ in range(args.input_len)], params)

    timer = PhaseTimer(time.thread_time if args.clock == "thread" else time.perf_counter)
    info = instrument(engine, timer)
    gc.callbacks.append(timer.gc_callback)
    decode_steps: list[dict[str, float]] = []
    num_prefill_steps, prefill_ms = 0, 0.0
    profiler = cProfile.Profile() if args.profile else None
    outputs = 0
    while engine.has_unfinished_requests():
        decoding = profiler is not None and num_prefill_steps > 0 and info.get("num_tokens") == args.batch
        if decoding:
            profiler.enable()
        start = timer.clock()
        outputs += sum(o.finished for o in engine.step())
        total = timer.clock() - start
        if decoding:
            profiler.disable()
        step = derive(timer.take(), total)
        if info["num_reqs"] == args.batch and info["num_tokens"] == args.batch:
            decode_steps.append(step)
        else:
            num_prefill_steps += 1
            prefill_ms += step["step"]
    gc.callbacks.remove(timer.gc_callback)
    assert outputs == args.batch, f"{outputs} of {args.batch} requests finished"

    keys = [k for k, _ in PHASES] + ["gc", "host", "step"]
    median = {k: statistics.median(s.get(k, 0.0) for s in decode_steps) for k in keys}
    mean = {k: statistics.fmean(s.get(k, 0.0) for s in decode_steps) for k in keys}
    result = {"batch": args.batch, "input_len": args.input_len, "output_len": args.max_tokens,
              "vocab_size": vocab_size, "shape": args.shape or "tiny", "device": args.device, "temperature": args.temperature,
              "clock": args.clock, "output_kind": args.output_kind, "gc_freeze": args.gc_freeze, "logprobs": args.logprobs,
              "num_decode_steps": len(decode_steps), "num_prefill_steps": num_prefill_steps,
              "prefill_ms_total": prefill_ms, "median_ms": median, "mean_ms": mean}
    print_table(result)
    if profiler is not None:
        print("\ncProfile of the decode steps (profiled steps run slower; shares are what matter):")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile_lines)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_table(r: dict) -> None:
    med, mean = r["median_ms"], r["mean_ms"]
    print(f"\n{r['shape']} on {r['device']}, batch {r['batch']}, {r['input_len']} in / {r['output_len']} out, "
          f"vocab {r['vocab_size']}, "
          f"temperature {r['temperature']}, {r['output_kind']}, logprobs {r['logprobs']}, "
          f"gc_freeze {r['gc_freeze']}: "
          f"{r['num_decode_steps']} decode steps "
          f"({r['num_prefill_steps']} prefill steps, {r['prefill_ms_total']:.0f} ms)")
    print(f"{'phase':<40} {'median ms':>10} {'mean ms':>9} {'us/req':>8}")
    for key, label in PHASES + [GC]:
        print(f"{label:<40} {med[key]:>10.3f} {mean[key]:>9.3f} {med[key] * 1e3 / r['batch']:>8.1f}")
    print(f"{'host (step - forward - LM head)':<40} {med['host']:>10.3f} {mean['host']:>9.3f} "
          f"{med['host'] * 1e3 / r['batch']:>8.1f}")
    print(f"{'step total':<40} {med['step']:>10.3f} {mean['step']:>9.3f}")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--shape", default=None, help="a shipped shape's real config (e.g. qwen3-0.6b, its vocab) "
                                                 "instead of the 1-layer model: for a GPU run")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--logprobs", type=int, default=None, help="top log-probabilities per token")
    add_sampling_args(p, default_max_tokens=128)  # --max-tokens is the output length
    p.set_defaults(temperature=0.0)  # greedy, as the throughput benchmarks run
    p.add_argument("--output-kind", choices=("final_only", "delta", "cumulative"), default="final_only")
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-memory", type=int, default=256 << 20, help="bytes for the KV pool")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after building the engine")
    p.add_argument("--async-scheduling", action="store_true",
                   help="schedule step N+1 before reading step N's tokens (on the CPU nothing overlaps)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="thread: this thread's CPU time, which other processes on a busy machine do not "
                        "inflate (use with --threads 1)")
    p.add_argument("--profile", action="store_true", help="cProfile the decode steps")
    p.add_argument("--profile-lines", type=int, default=30)
    p.add_argument("--output-json", default=None)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
