"""The dequantised HF folder every bf16 engine reads: tokenmill's own GGUF dequantisation (the
same numbers tokenmill loads from the GGUF), rounded once to bf16 and saved as safetensors with
the file's config and tokenizer. vLLM reads it, llama.cpp's converter turns it into a bf16 GGUF."""

from __future__ import annotations

import json
import os
from pathlib import Path


def dequantised_hf_folder(gguf_path: str, out: str) -> str:
    """Write (once) `out` with config.json, model.safetensors (bf16) and the tokenizer; return `out`."""
    folder = Path(out)
    if (folder / "model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import save_file

    from tokenmill.config.gguf_metadata import gguf_hf_config
    from tokenmill.config.gguf_weights import iter_gguf_weights
    from tokenmill.config.tokenizer import load_tokenizer

    config = gguf_hf_config(gguf_path)
    config.dtype = "bfloat16"
    tensors = {name: t.to(torch.bfloat16).contiguous() for name, t in iter_gguf_weights(gguf_path, config)}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    load_tokenizer(gguf_path).save_pretrained(str(folder))
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    (folder / "tokenmill-source.json").write_text(json.dumps({"gguf": os.path.abspath(gguf_path)}))
    return out
