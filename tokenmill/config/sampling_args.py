"""Sampling flags shared by `tokenmill generate` and `tokenmill chat`."""

from __future__ import annotations

import argparse

from tokenmill.sampling_params import SamplingParams


def add_sampling_args(parser: argparse.ArgumentParser, default_max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=default_max_tokens, help="most tokens to generate")
    g.add_argument("--min-tokens", type=int, default=0, help="tokens to generate before EOS or a stop may end")
    g.add_argument("--temperature", type=float, default=0.7, help="0 is greedy; higher is more random")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens of this "
                                                            "total probability")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the top one")
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1 discourages tokens already in the prompt or output")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated")
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per earlier occurrence of a generated token")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params_from_args(args: argparse.Namespace, **overrides) -> SamplingParams:
    values = dict(
        max_tokens=args.max_tokens, min_tokens=args.min_tokens, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)
    values.update(overrides)
    return SamplingParams(**values)
