"""Attention that is not plain full attention, at real model shapes with dummy weights:

- `minimax`: MiniMax-M1's shape (`config/shapes/minimax-m1.json`) cut to 8 layers, 7 lightning and
  1 softmax (the checkpoint's ratio), and 8 experts (a decode token still runs its top 2: the
  same expert work per token as 32 experts, in a quarter of the memory). Beside it the same model
  with all 8 layers softmax. Decode step time (ms) at batch 1 for contexts of 1k to 64k tokens
  (the lightning layers' cost is flat in the context) and at batch 8 for 4k and 32k, and prefill
  tokens/s at 32k.
- `mistral`: Mistral-7B's shape (`mistral-7b.json`, 4k window) at 16k tokens of context, and the
  same model without its window: decode ms per step at batch 1 and 8, and prefill tokens/s.

Decode is timed over steps once every request of the batch is decoding (its prefill done), so
each number is a steady-state step: `LLMEngine.step` with CUDA graphs and async scheduling, as
served. Run: `python -m tokenmill.benchmarks.hybrid {minimax,mistral} [--json FILE]`.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from tokenmill.benchmarks.common import sync, write_json
from tokenmill.config.model_source import CONFIGS_DIR

MINIMAX_LAYERS = ["linear_attention"] * 7 + ["full_attention"]
# (batch, context) points.
MINIMAX_POINTS = [(1, n) for n in (1024, 4096, 16384, 32768, 65536)] + [(8, 4096), (8, 32768)]
MISTRAL_POINTS = [(1, 16384), (8, 16384)]


def variant(shape: str, folder: Path, **overrides) -> str:
    """An HF folder (config.json only: dummy weights) of shipped `shape` with `overrides`."""
    config = json.loads((CONFIGS_DIR / f"{shape}.json").read_text())
    config.update(overrides)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def measure(llm, context: int, batch: int, decode_steps: int, seed: int = 0) -> dict:
    """Prefill `batch` prompts of `context` random tokens, then time `decode_steps` decode steps."""
    from tokenmill import SamplingParams

    engine, device = llm.engine, llm.engine.config.device
    rng = random.Random(seed)
    vocab = engine.config.model.vocab_size
    params = SamplingParams(temperature=0, max_tokens=decode_steps + 4, ignore_eos=True)
    ids = [f"c{context}-b{batch}-{i}" for i in range(batch)]
    sync(device)
    start = time.perf_counter()
    for request_id in ids:
        engine.add_request(request_id, [rng.randrange(vocab) for _ in range(context)], params)
    requests = engine.core.scheduler.requests
    while any(requests[r].num_output_tokens == 0 for r in ids if r in requests):
        engine.step()
    sync(device)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(decode_steps):
        engine.step()
    sync(device)
    step_ms = (time.perf_counter() - start) / decode_steps * 1000
    while engine.has_unfinished_requests():
        engine.step()
    return {"context": context, "batch": batch, "decode_step_ms": step_ms,
            "prefill_tokens_per_s": batch * context / prefill_s}


def run_model(folder: str, points: list[tuple[int, int]], decode_steps: int, label: str) -> list[dict]:
    from tokenmill import LLM

    rows = []
    max_model_len = max(context for _, context in points) + 2 * decode_steps
    with LLM(folder, load_format="dummy", dtype="bfloat16", max_model_len=max_model_len,
             max_num_seqs=max(batch for batch, _ in points), enable_prefix_caching=False,
             gpu_memory_utilization=0.88) as llm:
        measure(llm, min(256, max_model_len - 16), 1, 8)  # warm-up: compile the prefill and decode kernels
        for batch, context in points:
            row = {"model": label, **measure(llm, context, batch, decode_steps)}
            print(f"{label:>22}  batch {batch:2d}  context {context:6d}: decode {row['decode_step_ms']:7.2f} ms/step"
                  f"   prefill {row['prefill_tokens_per_s']:9.0f} tok/s", flush=True)
            rows.append(row)
    torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], models: tuple[str, str]) -> list[str]:
    """Decode step time of the two models side by side, and the ratio (second / first)."""
    first, second = models
    lines = [f"{'batch':>5} {'context':>7} | {first:>22} | {second:>22} | ratio"]
    by_key = {(r["model"], r["batch"], r["context"]): r for r in rows}
    for batch, context in sorted({(r["batch"], r["context"]) for r in rows}):
        a, b = by_key.get((first, batch, context)), by_key.get((second, batch, context))
        if a and b:
            lines.append(f"{batch:5d} {context:7d} | {a['decode_step_ms']:19.2f} ms | {b['decode_step_ms']:19.2f} ms"
                         f" | {b['decode_step_ms'] / a['decode_step_ms']:.2f}x")
    return lines


def minimax(tmp: Path, decode_steps: int) -> dict:
    hybrid = variant("minimax-m1", tmp / "m1-hybrid", num_hidden_layers=8, layer_types=MINIMAX_LAYERS,
                     num_local_experts=8)
    full = variant("minimax-m1", tmp / "m1-full", num_hidden_layers=8, layer_types=["full_attention"] * 8,
                   num_local_experts=8)
    rows = run_model(hybrid, MINIMAX_POINTS, decode_steps, "M1 8L hybrid (7 lin)")
    rows += run_model(full, MINIMAX_POINTS, decode_steps, "M1 8L all softmax")
    prefill = {r["model"]: r["prefill_tokens_per_s"] for r in rows if r["batch"] == 1 and r["context"] == 32768}
    lines = table(rows, ("M1 8L hybrid (7 lin)", "M1 8L all softmax"))
    lines += [f"prefill at 32k tokens (batch 1): {m}: {v:.0f} tok/s" for m, v in prefill.items()]
    return {"rows": rows, "table": lines}


def mistral(tmp: Path, decode_steps: int) -> dict:
    windowed = variant("mistral-7b", tmp / "mistral-window")
    plain = variant("mistral-7b", tmp / "mistral-full", sliding_window=None)
    rows = run_model(windowed, MISTRAL_POINTS, decode_steps, "Mistral-7B window 4k")
    rows += run_model(plain, MISTRAL_POINTS, decode_steps, "Mistral-7B full")
    return {"rows": rows, "table": table(rows, ("Mistral-7B window 4k", "Mistral-7B full"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", choices=("minimax", "mistral"))
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = (minimax if args.part == "minimax" else mistral)(Path(tmp), args.decode_steps)
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print("\n".join(result["table"]))
    write_json(args.json, result)


if __name__ == "__main__":
    main()
