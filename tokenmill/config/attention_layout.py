"""Which attention each decoder layer runs, read once from the HF config as each family's HF
modeling code reads it.

Kinds:
- `full_attention`: causal softmax attention over the whole context (paged KV cache).
- `sliding_attention`: causal softmax attention where the query at position p sees the keys at
  positions (p - window, p], itself included (HF's `sliding_window_overlay`: kv > q - window).
- `linear_attention`: MiniMax's lightning attention, a decayed linear recurrence whose whole
  history is one `head_dim x head_dim` state per head and request (no KV cache).

How each family names it (transformers 5):
- Mistral: `sliding_window` (not null) windows every layer; it has no per-layer switch.
- Qwen2 / Qwen3: a window only with `use_sliding_window`; then layers `i >= max_window_layers`
  slide (HF builds `layer_types` from these), or an explicit `layer_types` decides.
- MiniMax: `layer_types` of `full_attention` / `linear_attention` (the original checkpoints'
  `attn_type_list`: 1 softmax, 0 linear); a `sliding_window` windows its softmax layers.
- Llama: no window field; one there is ambiguous (HF's Llama ignores it) and is refused.
- Families whose window rule is the same (Mixtral as Mistral, Qwen2/3-MoE as Qwen2/3) get the same
  layout; other families are read as full attention, and their model classes refuse a window.

The layout is used by the model (a window per layer), the engine config (whether KV blocks can be
freed behind the window, whether the model keeps recurrent state) and the start-up checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"
LINEAR = "linear_attention"


class UnsupportedModelConfig(ValueError):
    """A config field that changes the model's math and that tokenmill does not implement."""

    def __init__(self, architecture: str, field: str, value: Any, detail: str = "") -> None:
        super().__init__(f"{architecture}: config field {field}={value!r} is not supported"
                         + (f": {detail}" if detail else "") + " (docs/models.md lists what is)")
        self.field = field


@dataclass(frozen=True)
class AttentionLayout:
    layer_kinds: tuple[str, ...]  # one of FULL / SLIDING / LINEAR per decoder layer
    sliding_window: int | None = None  # tokens a sliding layer's query sees, itself included

    def window(self, layer: int) -> int | None:
        """The layer's window, or None (full or linear attention)."""
        return self.sliding_window if self.layer_kinds[layer] == SLIDING else None

    @property
    def num_linear_layers(self) -> int:
        return sum(kind == LINEAR for kind in self.layer_kinds)

    @property
    def is_hybrid(self) -> bool:
        """Some layers keep a recurrent state per request (a state slot) instead of KV blocks."""
        return self.num_linear_layers > 0

    @property
    def kv_free_window(self) -> int | None:
        """The window behind which no layer reads a key again, where every layer with a KV cache
        slides: KV blocks wholly behind it can be freed. None: a full-attention layer reads every
        block to the end."""
        if self.sliding_window is None or any(kind == FULL for kind in self.layer_kinds):
            return None
        return self.sliding_window


def _window(architecture: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UnsupportedModelConfig(architecture, "sliding_window", value, "a window is a positive token count")
    return value


def _check_kinds(architecture: str, kinds: list[str], allowed: tuple[str, ...], num_layers: int) -> None:
    if len(kinds) != num_layers:
        raise UnsupportedModelConfig(architecture, "layer_types", kinds,
                                     f"{len(kinds)} entries for {num_layers} layers")
    unknown = sorted(set(kinds) - set(allowed))
    if unknown:
        raise UnsupportedModelConfig(architecture, "layer_types", unknown[0],
                                     f"this family's layers are {', '.join(allowed)}")


def attention_layout(hf_config: Any, architecture: str) -> AttentionLayout:
    """The layout of `hf_config` (architecture: its HF `architectures[0]`); raises
    `UnsupportedModelConfig` for a window setting the family does not define."""
    num_layers = hf_config.num_hidden_layers
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        # HF's config nulls the window unless use_sliding_window; layer_types then follows from
        # max_window_layers, unless the checkpoint gave its own.
        window = window if getattr(hf_config, "use_sliding_window", False) else None
        if layer_types is None:
            first = getattr(hf_config, "max_window_layers", num_layers)
            layer_types = [SLIDING if window is not None and i >= first else FULL for i in range(num_layers)]
        kinds = list(layer_types)
        _check_kinds(architecture, kinds, (FULL, SLIDING), num_layers)
        if SLIDING in kinds and window is None:
            raise UnsupportedModelConfig(architecture, "layer_types", SLIDING,
                                         "sliding layers without a window (use_sliding_window / sliding_window)")
        return AttentionLayout(tuple(kinds), _window(architecture, window) if SLIDING in kinds else None)
    if architecture in ("MistralForCausalLM", "MixtralForCausalLM"):
        if layer_types is not None:
            raise UnsupportedModelConfig(architecture, "layer_types", layer_types,
                                         "HF's Mistral applies sliding_window to every layer")
        if window is None:
            return AttentionLayout((FULL,) * num_layers)
        return AttentionLayout((SLIDING,) * num_layers, _window(architecture, window))
    if architecture == "MiniMaxForCausalLM":
        if layer_types is None:
            types = getattr(hf_config, "attn_type_list", None)
            if types is None:
                raise UnsupportedModelConfig(architecture, "layer_types", None,
                                             "a hybrid model names each layer's attention")
            layer_types = [FULL if t == 1 else LINEAR for t in types]
        kinds = list(layer_types)
        _check_kinds(architecture, kinds, (FULL, LINEAR), num_layers)
        if window is not None:
            window = _window(architecture, window)
            kinds = [SLIDING if kind == FULL else kind for kind in kinds]
        return AttentionLayout(tuple(kinds), window)
    if architecture == "LlamaForCausalLM":
        if window is not None:
            raise UnsupportedModelConfig(architecture, "sliding_window", window,
                                         "this family has no sliding window in HF (its models ignore the field)")
        if layer_types is not None and set(layer_types) != {FULL}:
            raise UnsupportedModelConfig(architecture, "layer_types", layer_types)
    return AttentionLayout((FULL,) * num_layers)
