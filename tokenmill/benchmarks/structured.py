"""`tokenmill bench structured`: what a JSON-schema constraint costs per generated token.

Two measurements in one run, at batch 32 x 64 new tokens (greedy) by default:
1. end to end: `LLM.generate` unconstrained, then with `structured_outputs` (a JSON schema long
   enough that no row finishes before 64 tokens), time per token of each and their ratio. The
   constrained outputs are replayed through a fresh grammar; if a token is refused, the engine is
   not enforcing the grammar yet, and this number is reported as not valid.
2. mask only: the same batch's per-step structured-output work, outside the engine —
   `batch_bitmask` (fill), `apply_bitmask` on [32, vocab] logits on the model's device, and
   `accept_token` for each row — against the measured unconstrained step time.

Prints both and the ratios; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

ITEM = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
        "qty": {"type": "integer", "minimum": 1, "maximum": 999}}, "required": ["name", "qty"]}
# minItems keeps every row generating for the whole run, so the batch stays full.
BENCH_SCHEMA = {"type": "object", "properties": {"order_id": {"type": "integer"}, "items": {
    "type": "array", "items": ITEM, "minItems": 40}}, "required": ["order_id", "items"]}
PROMPT = "Write the JSON for a grocery order with many items, each with a name and a quantity."


def add_parser(subparsers) -> argparse.ArgumentParser:
    from tokenmill.config import EngineArgs

    p = subparsers.add_parser("structured", help="JSON-schema constrained vs unconstrained decoding")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions of each run (best is kept)")
    p.add_argument("--mask-only", action="store_true",
                   help="skip the constrained end-to-end run (engine without grammar support)")
    p.add_argument("--output-json", default=None)
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> dict:
    from tokenmill import LLM, SamplingParams
    from tokenmill.config import EngineArgs
    from tokenmill.sampling_params import StructuredOutputsParams
    from tokenmill.structured_output import StructuredOutputManager

    engine_args = EngineArgs.from_cli_args(args)
    llm = LLM(**vars(engine_args))
    config = llm.engine.config
    device = torch.device(config.device)
    tokenizer = llm.get_tokenizer()
    vocab = config.model.vocab_size
    batch, out_len = args.num_prompts, args.output_len
    prompts = [f"{PROMPT} Order number {i}." for i in range(batch)]
    free = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=out_len)
    constraint = StructuredOutputsParams(json=BENCH_SCHEMA)
    constrained = SamplingParams(temperature=0.0, max_tokens=out_len, structured_outputs=constraint)

    llm.generate(prompts[:2], [SamplingParams(max_tokens=4, ignore_eos=True)] * 2, use_tqdm=False)
    free_s, free_out = _best_time(lambda: llm.generate(prompts, [free] * batch, use_tqdm=False), args.repeat, device)
    free_tokens = sum(len(o.outputs[0].token_ids) for o in free_out)
    result: dict = {
        "benchmark": "structured", "model": config.model.served_model_name, "device": str(device),
        "batch": batch, "output_len": out_len,
        "unconstrained": {"seconds": free_s, "tokens": free_tokens, "ms_per_token": 1e3 * free_s / free_tokens,
                          "ms_per_step": 1e3 * free_s / out_len},
    }
    print(f"unconstrained: {free_tokens} tokens in {free_s:.3f}s = {result['unconstrained']['ms_per_token']:.3f} "
          f"ms/token ({result['unconstrained']['ms_per_step']:.2f} ms/step, batch {batch}, {device})")

    manager = StructuredOutputManager(tokenizer, vocab, stop_token_ids=_stop_ids(tokenizer))
    if not args.mask_only:
        llm.generate(prompts[:2], [constrained] * 2, use_tqdm=False)
        con_s, con_out = _best_time(lambda: llm.generate(prompts, [constrained] * batch, use_tqdm=False),
                                    args.repeat, device)
        con_tokens = sum(len(o.outputs[0].token_ids) for o in con_out)
        enforced = all(_follows(manager, constraint, o.outputs[0].token_ids) for o in con_out)
        result["constrained"] = {"seconds": con_s, "tokens": con_tokens, "ms_per_token": 1e3 * con_s / con_tokens,
                                 "grammar_enforced": enforced}
        result["ratio_end_to_end"] = result["constrained"]["ms_per_token"] / result["unconstrained"]["ms_per_token"]
        note = "" if enforced else "  (NOT VALID: the engine did not enforce the grammar)"
        print(f"constrained:   {con_tokens} tokens in {con_s:.3f}s = {result['constrained']['ms_per_token']:.3f} "
              f"ms/token; ratio constrained / unconstrained = {result['ratio_end_to_end']:.3f}{note}")

    mask = measure_mask_cost(manager, tokenizer, constraint, batch, out_len, vocab, device, args.repeat)
    step_ms = result["unconstrained"]["ms_per_step"]
    result["mask"] = mask
    result["ratio_mask_estimate"] = (step_ms + mask["total_ms_per_step"]) / step_ms
    print(f"mask work per step at batch {batch}: fill {mask['fill_ms_per_step']:.3f} ms + apply "
          f"{mask['apply_ms_per_step']:.3f} ms + accept {mask['accept_ms_per_step']:.3f} ms = "
          f"{mask['total_ms_per_step']:.3f} ms = {100 * mask['total_ms_per_step'] / step_ms:.1f}% of a "
          f"{step_ms:.2f} ms step -> estimated ratio {result['ratio_mask_estimate']:.3f}")
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def measure_mask_cost(manager, tokenizer, constraint, batch: int, steps: int, vocab: int,
                      device: torch.device, repeat: int = 3) -> dict:
    """Per-step cost of the structured-output work for `batch` rows over `steps` tokens.

    Rows follow real documents of the schema (tokenized JSON), so the matchers visit the states a
    model's output would: keys, strings, numbers, separators.
    """
    from tokenmill.structured_output import apply_bitmask

    docs = [tokenizer.encode(json.dumps(_document(i)), add_special_tokens=False) for i in range(batch)]
    assert all(len(d) >= steps for d in docs), "bench documents shorter than the step count"
    logits = torch.randn(batch, vocab, device=device)
    best = None
    for _ in range(max(1, repeat)):
        grammars = [manager.new_request(constraint) for _ in range(batch)]
        rows = list(range(batch))
        fill = apply = accept = 0.0
        for step in range(steps):
            t0 = time.perf_counter()
            bitmask = manager.batch_bitmask(grammars)
            t1 = time.perf_counter()
            apply_bitmask(logits, bitmask, rows)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t2 = time.perf_counter()
            for row, g in enumerate(grammars):
                ok = g.accept_token(docs[row][step])
                assert ok, "a schema document's token was refused"
            t3 = time.perf_counter()
            fill, apply, accept = fill + t1 - t0, apply + t2 - t1, accept + t3 - t2
        total = fill + apply + accept
        if best is None or total < best[3]:
            best = (fill, apply, accept, total)
    fill, apply, accept, total = (1e3 * x / steps for x in best)
    return {"fill_ms_per_step": fill, "apply_ms_per_step": apply, "accept_ms_per_step": accept,
            "total_ms_per_step": total}


def _document(i: int) -> dict:
    names = ["apples", "bread", "milk", "eggs", "coffee beans", "rice", "olive oil", "tomatoes"]
    return {"order_id": 1000 + i,
            "items": [{"name": names[(i + k) % len(names)], "qty": 1 + (i * 7 + k) % 12} for k in range(40)]}


def _follows(manager, constraint, token_ids) -> bool:
    grammar = manager.new_request(constraint)
    return all(grammar.accept_token(t) for t in token_ids if not grammar.is_terminated())


def _stop_ids(tokenizer) -> list[int] | None:
    eos = getattr(tokenizer, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else None


def _best_time(fn, repeat: int, device: torch.device):
    best, out = None, None
    for _ in range(max(1, repeat)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    return best, out
