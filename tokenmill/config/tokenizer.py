"""Tokenizers: from an HF folder, or built by transformers from a GGUF file's metadata.

Building a tokenizer from GGUF metadata takes seconds, so the result is saved once under
`~/.cache/tokenmill/tokenizers/` (keyed by the file's path, size and mtime) and reloaded from there.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tokenmill.config.cache_root import cache_root


def _cache_dir(gguf_path: str) -> Path:
    stat = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "tokenizers" / key


def load_tokenizer(path: str | None) -> Any:
    """A transformers fast tokenizer for `path` (a .gguf file or a folder), or None."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    if path.endswith(".gguf"):
        cached = _cache_dir(path)
        if (cached / "tokenizer.json").is_file():
            return AutoTokenizer.from_pretrained(str(cached))
        tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        try:
            cached.mkdir(parents=True, exist_ok=True)
            tokenizer.save_pretrained(str(cached))
        except OSError:
            pass  # a read-only home only costs the rebuild next time
        return tokenizer
    return AutoTokenizer.from_pretrained(path)
