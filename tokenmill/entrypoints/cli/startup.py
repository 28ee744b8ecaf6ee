"""Starting an in-process engine for `tokenmill generate` and `tokenmill chat`, saying what it does.

A start takes a few seconds (warm cache) to most of a minute (first start: the GGUF is converted,
tokenmill/config/gguf_cache.py), so each step is announced on stderr as it begins: the thread count,
the model, the conversion (with a progress bar on a terminal), the KV pool and why that size, and
the time to ready. Once the engine is up, the engine's loggers go back to the `--log-level` the
user chose, so the conversation itself is not interleaved with log lines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import time
from typing import Iterator

from tokenmill.entrypoints import threads

logger = logging.getLogger("tokenmill.cli")


def add_thread_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine-threads", type=int, default=None,
                        help="CPU threads for the model's math (default: the cores not busy with "
                             "other work right now, or $OMP_NUM_THREADS if set)")


@contextlib.contextmanager
def start_up_messages(log_level: str | None) -> Iterator[None]:
    """Shows tokenmill's INFO lines on stderr as `tokenmill: ...` while the engine starts (unless
    the user asked for a quieter level than WARNING explicitly: ERROR or CRITICAL)."""
    level = getattr(logging, str(log_level or "WARNING").upper(), logging.WARNING)
    root = logging.getLogger("tokenmill")
    if level > logging.WARNING:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tokenmill: %(message)s"))
    saved = root.level, root.propagate
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))
    root.propagate = level < logging.INFO  # --log-level debug/info keeps the full root format too
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        root.propagate = saved[1]


def start_engine(args: argparse.Namespace):
    """Chooses the thread count, then builds the `LLMEngine` of `args`, announcing each step."""
    from tokenmill.config import EngineArgs

    start = time.perf_counter()
    with start_up_messages(args.log_level):
        load = threads.start_load_sample()  # measured while the config is read, not instead
        from tokenmill.engine.llm_engine import LLMEngine

        engine_args = EngineArgs.from_cli_args(args)
        logger.info("loading %s", engine_args.model or "the embedded SmolLM2-135M-Instruct")
        config = engine_args.create_engine_config()
        threads.apply_cpu_threads(args.engine_threads, since=load)
        logger.info("building the engine: %s weights (%s), %s on %s, max_model_len %d",
                    config.load_format, config.model.architecture,
                    str(config.model.dtype).removeprefix("torch."), config.device,
                    config.model.max_model_len)
        engine = LLMEngine(config)
        logger.info("ready in %.1f s", time.perf_counter() - start)
    return engine
