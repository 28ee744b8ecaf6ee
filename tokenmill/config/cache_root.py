"""Where tokenmill keeps what it derives from model files (converted GGUF folders, tokenizers)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """`$TOKENMILL_CACHE`, default `~/.cache/tokenmill`."""
    return Path(os.environ.get("TOKENMILL_CACHE") or Path.home() / ".cache" / "tokenmill")
