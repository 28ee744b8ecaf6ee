"""How many distinct experts a decode step of `--batch` tokens routes to, per MoE layer, with the
engine's dummy weights: what the bytes floor of an MoE decode step at that batch rests on (each
distinct expert is read once a step).

    python -m tokenmill.benchmarks.expert_spread --model qwen3-30b-a3b --layers 4 --batch 10

Runs on the CPU: the shipped shape with its first `--layers` layers (the routing of those layers;
4 of Qwen3-30B-A3B's fit in ~7 GB), `--batch` random token-id prompts decoding together, eager
steps. Records the routing's chosen ids at every layer of every step where exactly `--batch`
tokens run, and prints their distinct count beside what a uniform draw gives,
E * (1 - (1 - k/E)^batch).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen3-30b-a3b", help="a shipped MoE shape")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.config.model_source import CONFIGS_DIR
    from tokenmill.model.layers.moe import fused_moe

    config = json.loads((CONFIGS_DIR / f"{args.model}.json").read_text())
    config["num_hidden_layers"] = args.layers
    experts = config.get("num_experts") or config.get("n_routed_experts") or config["num_local_experts"]
    top_k = config["num_experts_per_tok"]
    distinct: list[int] = []
    select = fused_moe.select_experts

    def recording(logits, routing, correction_bias=None):
        weights, ids = select(logits, routing, correction_bias)
        if ids.shape[0] == args.batch:
            distinct.append(len(torch.unique(ids)))
        return weights, ids

    fused_moe.select_experts = recording  # the CPU path's routing (FusedMoE.forward_native)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(config))
        llm = LLM(folder, load_format="dummy", dtype="bfloat16", max_num_seqs=args.batch, enforce_eager=True,
                  max_model_len=args.input_len + args.steps + 16, device="cpu")
        rng = random.Random(0)
        vocab = config["vocab_size"]
        prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.batch)]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=args.steps, ignore_eos=True), use_tqdm=False)
    fused_moe.select_experts = select
    uniform = experts * (1 - (1 - top_k / experts) ** args.batch)
    print(f"{args.model}, first {args.layers} layers, {args.batch}-token decode steps: {len(distinct)} "
          f"(step, layer) routings; distinct experts mean {statistics.mean(distinct):.1f}, min {min(distinct)}, "
          f"max {max(distinct)}, of {experts}; a uniform draw: {uniform:.1f}")


if __name__ == "__main__":
    main()
