"""vLLM's model flags, with vLLM's meaning where it can apply to local files (docs/cli.md):
`--chat-template`, `--generation-config`, `--max-logprobs`, `--quantization`, `--trust-remote-code`,
`--revision`, `--download-dir` (`--quantization` is `config/quantization.py`'s).

Helpers of `EngineArgs.create_engine_config` (`config/engine_args.py`), kept apart so the
config's own resolution stays short.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

from tokenmill.config.model_source import ModelSource

logger = logging.getLogger("tokenmill.config")

# The most top logprobs per token the sampler returns (also SamplingParams' own bound).
MAX_LOGPROBS_LIMIT = 20


def add_vllm_model_args(parser: argparse.ArgumentParser, d: Any) -> None:
    """Flags a vLLM user types, with vLLM's meaning where it applies (docs/cli.md); `d`: an
    `EngineArgs` holding the defaults."""
    parser.add_argument("--chat-template", default=None,
                        help="chat template for chat requests, replacing the model's: a file, or the "
                             "Jinja template itself")
    parser.add_argument("--generation-config", default=d.generation_config,
                        help="sampling defaults for requests that leave a field unset: auto (the "
                             "model folder's generation_config.json, if any), vllm (none: "
                             "tokenmill's defaults), or a folder holding generation_config.json")
    parser.add_argument("--max-logprobs", type=int, default=d.max_logprobs,
                        help=f"most logprobs a request may ask for per token (at most {MAX_LOGPROBS_LIMIT})")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="accepted; changes nothing: tokenmill never runs code from a model "
                             "folder, only its own implementations of supported architectures")
    parser.add_argument("--revision", default=None,
                        help="refused: models are local files, so no revision can be checked out")
    parser.add_argument("--download-dir", default=None,
                        help="accepted and unused, as vLLM ignores it for a local model: tokenmill "
                             "never downloads")


def check_vllm_model_args(args: Any) -> None:
    """`args`: the `EngineArgs` being resolved."""
    if args.revision is not None:
        raise ValueError(f"--revision {args.revision}: tokenmill loads local files and never downloads, "
                         f"so it cannot check out a revision; point --model at that revision's folder")
    if not 0 <= args.max_logprobs <= MAX_LOGPROBS_LIMIT:
        raise ValueError(f"max_logprobs must be in [0, {MAX_LOGPROBS_LIMIT}] (the most the sampler "
                         f"returns), got {args.max_logprobs}")
    if args.trust_remote_code:
        logger.info("--trust-remote-code changes nothing: tokenmill runs no code from model folders, "
                    "only its own implementations of the architectures it supports")


def read_chat_template(value: str | None) -> str | None:
    """vLLM's rule: a path to a file is read; text with Jinja markup is the template itself."""
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


# generation_config.json fields a request's sampling can take, as SamplingParams names.
_GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                             "min_p": "min_p", "repetition_penalty": "repetition_penalty",
                             "max_new_tokens": "max_tokens"}


def sampling_defaults(generation_config: str, source: ModelSource) -> dict:
    """Sampling defaults from a generation_config.json (vLLM's `--generation-config`): `auto`
    reads the model folder's file if it has one, `vllm` reads none, anything else is a folder."""
    if generation_config == "vllm":
        return {}
    if generation_config == "auto":
        folder = source.path if source.kind == "hf" else None
        if folder is None or not os.path.isfile(os.path.join(folder, "generation_config.json")):
            return {}
    else:
        folder = os.path.expanduser(generation_config)
        if not os.path.isfile(os.path.join(folder, "generation_config.json")):
            raise ValueError(f"--generation-config {generation_config}: no generation_config.json there "
                             f"(give auto, vllm or a folder that holds one)")
    with open(os.path.join(folder, "generation_config.json"), encoding="utf-8") as f:
        data = json.load(f)
    if data.get("do_sample") is False:
        data.setdefault("temperature", 0.0)  # greedy, as transformers runs it
    defaults = {name: data[key] for key, name in _GENERATION_CONFIG_FIELDS.items() if data.get(key) is not None}
    if defaults:
        logger.info("sampling defaults from %s/generation_config.json: %s", folder, defaults)
    return defaults
