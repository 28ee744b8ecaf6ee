"""A tokenizer for dummy weights at a shipped shape (`--model qwen3-0.6b --load-format dummy`).

The shapes ship no tokenizer, yet a newcomer types text. The embedded SmolLM2 tokenizer (49,152
tokens, with a chat template) encodes any prompt into ids every such model accepts; the model,
with random weights, then samples from its whole vocabulary (151,936 ids for Qwen3). So that
those ids show up in the output instead of vanishing, the tokenizer is widened to the model's
vocabulary with one placeholder per extra id, `<|dummy_60000|>`: encoding never produces them,
decoding prints them. The widened copy is written once to the user cache.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tokenmill.config.cache_root import cache_root
from tokenmill.config.gguf_cache import file_key
from tokenmill.config.model_source import ModelSource, default_gguf_path

logger = logging.getLogger(__name__)

EMBEDDED_VOCAB = 49152


def tokenizer_for_dummy_weights(vocab_size: int) -> str | None:
    """A tokenizer folder for a model of `vocab_size` ids, or None when the embedded model is not
    installed or its vocabulary is larger than the model's (its ids would be out of range)."""
    try:
        gguf = default_gguf_path()
    except ValueError:
        return None
    if vocab_size < EMBEDDED_VOCAB:
        return None
    folder = cache_root() / "dummy-tokenizers" / f"{file_key(gguf)}-{vocab_size}"
    if (folder / "tokenizer.json").is_file():
        return str(folder)
    from tokenmill.config.tokenizer import load_tokenizer

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".widening-", dir=folder.parent))
    except OSError:
        return gguf  # unwidened: ids past 49,152 decode to nothing
    try:
        load_tokenizer(gguf).save_pretrained(tmp)
        data = json.loads((tmp / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = data["model"]["vocab"]
        taken = set(vocab.values()) | {t["id"] for t in data.get("added_tokens", [])}
        for token_id in range(max(taken) + 1, vocab_size):
            vocab[f"<|dummy_{token_id}|>"] = token_id
        (tmp / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / "tokenizer.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return gguf
    return str(folder)


def with_dummy_tokenizer(source: ModelSource, hf_config: Any) -> ModelSource:
    """Dummy weights at a shipped shape have no tokenizer of their own: text goes through the
    embedded model's, widened to the model's vocabulary (tokenmill/config/dummy_tokenizer.py).
    `--tokenizer` names the real one."""
    if source.tokenizer_path is not None or source.load_format != "dummy":
        return source
    tokenizer = tokenizer_for_dummy_weights(hf_config.vocab_size)
    if tokenizer is None:
        return source
    logger.info("dummy weights: text goes through the embedded SmolLM2 tokenizer (the model's other "
                "ids print as <|dummy_N|>); --tokenizer names another")
    return dataclasses.replace(source, tokenizer_path=tokenizer)
