"""A GGUF file's metadata as a transformers config (the tensors are read by
`config/gguf_weights.py`)."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

# GGUF architecture -> (HF architecture, HF model_type)
_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


class CorruptModelError(ValueError):
    pass


@lru_cache(maxsize=4)
def gguf_reader(path: str):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # the gguf library raises assorted errors on bad files
        raise CorruptModelError(f"{path} is not a readable GGUF file ({type(exc).__name__})") from None


def gguf_field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_hf_config(path: str) -> Any:
    """A transformers config built from the file's metadata."""
    from transformers import AutoConfig

    reader = gguf_reader(path)
    arch = gguf_field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported "
                         f"(supported: {', '.join(_ARCHITECTURES)})")
    hf_arch, model_type = _ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    vocab = gguf_field(reader, f"{arch}.vocab_size") or len(gguf_field(reader, "tokenizer.ggml.tokens"))
    heads = gguf_field(reader, f"{arch}.attention.head_count")
    hidden = gguf_field(reader, f"{arch}.embedding_length")
    kwargs = dict(
        architectures=[hf_arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=gguf_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=gguf_field(reader, f"{arch}.block_count"),
        num_attention_heads=heads,
        num_key_value_heads=gguf_field(reader, f"{arch}.attention.head_count_kv", heads),
        max_position_embeddings=gguf_field(reader, f"{arch}.context_length", 2048),
        rms_norm_eps=gguf_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=gguf_field(reader, f"{arch}.rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    window = gguf_field(reader, f"{arch}.attention.sliding_window")
    if window:
        # The file's tensors load as this family's plain (full-attention) model: refuse rather
        # than serve a windowed model without its window.
        raise ValueError(f"{path}: GGUF field {arch}.attention.sliding_window={window} is not supported "
                         "(load the model from an HF folder, where sliding windows are)")
    key_length = gguf_field(reader, f"{arch}.attention.key_length")
    if key_length:
        kwargs["head_dim"] = key_length
    if arch == "qwen2":
        kwargs["attention_bias"] = True
    return AutoConfig.for_model(model_type, **kwargs)


# GGUF tensor-name parts of the linear layers (the weights `quantization="gguf"` keeps quantised).
LINEAR_TENSOR_PARTS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
KEEPABLE_TYPES = ("Q4_0", "Q4_1", "Q8_0")


def gguf_linear_weight_type(path: str) -> str:
    """The block type every linear layer's weight in the file has; refuses a file whose linear
    weights mix types or use a type that cannot be kept quantised (`KEEPABLE_TYPES`)."""
    reader = gguf_reader(path)
    kinds = sorted({t.tensor_type.name for t in reader.tensors
                    if t.name.startswith("blk.") and t.name.split(".")[2] in LINEAR_TENSOR_PARTS})
    if len(kinds) != 1 or kinds[0] not in KEEPABLE_TYPES:
        raise ValueError(f"{path}: quantization='gguf' keeps the linear weights quantised when all are one of "
                         f"{', '.join(KEEPABLE_TYPES)}; this file's are {', '.join(kinds) or 'absent'} "
                         f"(leave quantization unset to dequantise them)")
    return kinds[0]


def gguf_embedding_type(path: str) -> str | None:
    """The block type of the file's token embedding (the LM head's table when the head is tied to
    it, or when `output.weight` has the same type) where it can be kept quantised; else None."""
    reader = gguf_reader(path)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors if t.name in ("token_embd.weight", "output.weight")}
    kind = kinds.get("token_embd.weight")
    if kind not in KEEPABLE_TYPES or kinds.get("output.weight", kind) != kind:
        return None
    return kind
