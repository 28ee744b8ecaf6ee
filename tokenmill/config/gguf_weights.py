"""GGUF weights, dequantized with the `gguf` library (the config comes from `config/gguf_metadata.py`).

llama.cpp's converter renames every tensor and, for the Llama architecture, permutes the rows of
the Q and K projections (its RoPE pairs adjacent dimensions, HF's pairs the two halves). We map the
names back to HF's and undo the permutation, so the rest of tokenmill only ever sees HF weights.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import numpy as np
import torch

from tokenmill.config.gguf_metadata import LINEAR_TENSOR_PARTS, CorruptModelError, gguf_field, gguf_reader

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def _unpermute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> HF's half split)."""
    rows = weight.shape[0]
    return (weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def iter_gguf_weights(path: str, hf_config: Any, keep_quantized: str | None = None,
                      keep_embedding: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, float32 tensor)` for every tensor in the file. `keep_quantized`: a block
    type ("Q4_1", ...) whose linear-layer weights are yielded as their GGUF blocks instead (uint8
    `[out, blocks, block bytes]`, Q/K rows un-permuted like the floats), for `GgufLinearMethod`;
    `keep_embedding`: the same for the token embedding and output tables, of that type."""
    import gguf

    reader = gguf_reader(path)
    arch = gguf_field(reader, "general.architecture")
    for tensor in reader.tensors:
        name = _GLOBAL_NAMES.get(tensor.name)
        if name is not None and keep_embedding is not None and tensor.name in ("token_embd.weight", "output.weight"):
            if tensor.tensor_type.name != keep_embedding:
                raise CorruptModelError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                                        f"not {keep_embedding} like the token embedding")
            yield name, _quantized_rows(tensor, name, arch, hf_config)
            continue
        if name is None:
            match = _LAYER_RE.match(tensor.name)
            if match is None or match.group(2) not in _LAYER_NAMES:
                continue  # e.g. rope_freqs: recomputed from the config
            layer, part, kind = match.groups()
            name = f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
            if keep_quantized is not None and part in LINEAR_TENSOR_PARTS and kind == "weight":
                if tensor.tensor_type.name != keep_quantized:
                    raise CorruptModelError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, "
                                            f"not {keep_quantized} like the other linear weights")
                yield name, _quantized_rows(tensor, name, arch, hf_config)
                continue
        try:
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as exc:
            raise CorruptModelError(f"{path}: tensor {tensor.name} could not be read "
                                    f"({type(exc).__name__})") from None
        shape = tuple(int(d) for d in reversed(tensor.shape))
        data = np.asarray(data, dtype=np.float32).reshape(shape)
        if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = (hf_config.num_attention_heads if "q_proj" in name
                     else hf_config.num_key_value_heads)
            data = _unpermute(data, heads)
        if not data.flags.writeable:  # F32 tensors come straight from the read-only memory map
            data = data.copy()
        yield name, torch.from_numpy(np.ascontiguousarray(data))


def _quantized_rows(tensor: Any, name: str, arch: str, hf_config: Any) -> torch.Tensor:
    """A quantised tensor's GGUF blocks (uint8 `[out, blocks, block bytes]`; a row is whole blocks,
    so the Q/K row permutation applies to them as to float rows)."""
    import gguf

    _, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    data = np.asarray(tensor.data, dtype=np.uint8)
    data = data.reshape(int(tensor.shape[-1]) if len(tensor.shape) > 1 else 1, -1, block_bytes)
    if arch in ("llama", "mistral") and name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = hf_config.num_attention_heads if "q_proj" in name else hf_config.num_key_value_heads
        data = _unpermute(data, heads)
    if not data.flags.writeable:  # straight from the read-only memory map
        data = data.copy()
    return torch.from_numpy(np.ascontiguousarray(data))
