"""`tokenmill bench embed`: offline embedding throughput against sentence-transformers.

Workload: N passages (default 10,000) of 10 to 300 tokens, uniform, built deterministically from
a seed out of whole-word vocabulary entries (one token each, so lengths are exact). Both sides see
the same passages in the same dtype; the model's limit (256 for all-MiniLM-L6-v2) truncates the
longest ones on both sides. The passages are split into rounds and each round runs tokenmill and
the baseline back to back, alternating which goes first, so load from other processes on a shared
machine hits both alike. Timed: the whole `embed()` / `encode()` call, tokenization included.

Run: `tokenmill bench embed [--num-passages 10000] [--dtype float32] [--output-json out.json]`
or `python3 -m tokenmill.benchmarks.embed ...`. Prints numbers; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import time

import torch


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `embed` under the `bench` subcommands (`subparsers` from `add_subparsers`)."""
    p = subparsers.add_parser("embed", help="embedding throughput vs sentence-transformers")
    add_args(p)
    p.set_defaults(func=run)
    return p


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="embedding model folder (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--num-passages", type=int, default=10_000)
    p.add_argument("--min-tokens", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--max-batch-tokens", type=int, default=None,
                   help="tokenmill tokens per forward pass (default: 4096 on CPU, 32768 on CUDA)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--baseline-batch-size", type=int, default=32, help="sentence-transformers encode() batch size")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds the passages are split into")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--skip-baseline", action="store_true", help="time tokenmill only")
    p.add_argument("--output-json", default=None, help="write the results here as JSON")


def make_passages(tokenizer, num: int, min_tokens: int, max_tokens: int, seed: int) -> list[str]:
    """Deterministic passages whose token counts (with [CLS]/[SEP]) are uniform in [min, max]."""
    rng = random.Random(seed)
    vocab = sorted(w for w in tokenizer.get_vocab() if w.isascii() and w.isalpha() and len(w) > 1)
    specials = tokenizer.post_processor.num_special_tokens_to_add(False) if tokenizer.post_processor else 0
    out = []
    for _ in range(num):
        n_words = max(1, rng.randint(min_tokens, max_tokens) - specials)
        out.append(" ".join(rng.choice(vocab) for _ in range(n_words)))
    return out


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def run(args: argparse.Namespace) -> dict:
    from tokenmill.engine.embedding_engine import EmbeddingEngine

    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    engine = EmbeddingEngine(args.model, dtype=args.dtype, max_batch_tokens=args.max_batch_tokens, device=args.device)
    device = str(engine.device)
    passages = make_passages(engine.tokenizer, args.num_passages, args.min_tokens, args.max_tokens, args.seed)
    dtype = getattr(torch, args.dtype)

    baseline = None
    if not args.skip_baseline:
        from sentence_transformers import SentenceTransformer

        baseline = SentenceTransformer(engine.model_path, device=device).to(dtype).eval()
        baseline.max_seq_length = engine.max_model_len

    def tokenmill_side(texts: list[str]) -> torch.Tensor:
        outs = engine.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
        return torch.tensor([o.outputs.embedding for o in outs])

    def baseline_side(texts: list[str]) -> torch.Tensor:
        emb = baseline.encode(texts, batch_size=args.baseline_batch_size, convert_to_tensor=True,
                              show_progress_bar=False)
        return emb.float().cpu()

    sides = {"tokenmill": tokenmill_side}
    if baseline is not None:
        sides["sentence_transformers"] = baseline_side
    for fn in sides.values():  # warm-up: first-call allocations and lazy init out of the timings
        fn(passages[:64])

    rounds = max(1, min(args.rounds, len(passages)))
    bounds = [len(passages) * r // rounds for r in range(rounds + 1)]
    seconds = {name: 0.0 for name in sides}
    per_round, min_cos = [], 1.0
    for r in range(rounds):
        chunk = passages[bounds[r]:bounds[r + 1]]
        names = list(sides) if r % 2 == 0 else list(reversed(sides))
        emb, row = {}, {"passages": len(chunk)}
        for name in names:
            t0 = time.perf_counter()
            emb[name] = sides[name](chunk)  # both sides return host tensors: the GPU work is done
            row[name + "_s"] = time.perf_counter() - t0
            seconds[name] += row[name + "_s"]
        if len(emb) == 2:
            cos = torch.nn.functional.cosine_similarity(emb["tokenmill"], emb["sentence_transformers"])
            min_cos = min(min_cos, cos.min().item())
        per_round.append(row)
        print(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v:.2f}s" for k, v in row.items() if k.endswith("_s")),
              flush=True)

    lengths = [min(len(e.ids), engine.max_model_len) for e in engine.tokenizer.encode_batch(passages)]
    total_tokens = sum(lengths)
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "model": engine.model_path,
        "dtype": args.dtype,
        "device": device,
        "num_passages": len(passages),
        "tokens_after_truncation": total_tokens,
        "rounds": per_round,
    }
    for name, secs in seconds.items():
        result[name] = {"seconds": secs, "passages_per_s": len(passages) / secs, "tokens_per_s": total_tokens / secs}
        print(f"{name:>22}: {len(passages) / secs:8.1f} passages/s  {total_tokens / secs:9.0f} tokens/s  ({secs:.1f}s)")
    if baseline is not None:
        result["ratio"] = seconds["sentence_transformers"] / seconds["tokenmill"]
        result["min_cosine"] = min_cos
        print(f"{'ratio':>22}: {result['ratio']:.2f}x  (min cosine {min_cos:.5f})")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python3 -m tokenmill.benchmarks.embed", description=__doc__.split("\n")[0])
    add_args(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
