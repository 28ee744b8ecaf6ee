"""What batch-invariant mode (`--batch-invariant`, docs/rl.md) covers, checked once at start-up:
it has batch-invariant forms of the dense Llama-family layers (fixed-tile GEMMs, fixed-order
attention, SiLU, RMSNorm), unquantised, with full causal attention, run eagerly. Anything else is
refused with the reason, never run with batch-dependent kernels behind the flag's back."""

from __future__ import annotations

from typing import Any

from tokenmill.config.attention_layout import AttentionLayout

# Model families whose every layer has a batch-invariant form; others are refused.
BATCH_INVARIANT_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# The HF config fields that give a family's routed-expert count.
_EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts")


def check_batch_invariant(architecture: str, hf_config: Any, layout: AttentionLayout, attention_backend: str | None,
                          quantization: str | None, cpu_compile: bool, tensor_parallel_size: int) -> None:
    """Raise ValueError naming what batch-invariant mode cannot honour. `attention_backend`: the
    one asked for (None: the default); `quantization`: the method the weights would run with."""
    if architecture not in BATCH_INVARIANT_ARCHITECTURES:
        layers = [what for what, present in (
            ("mixture-of-experts", any(getattr(hf_config, f, None) for f in _EXPERT_FIELDS)),
            ("latent attention (MLA)", getattr(hf_config, "kv_lora_rank", None)),
            ("linear-attention", layout.is_hybrid)) if present]
        raise ValueError(f"batch_invariant is not implemented for {architecture}: there is no batch-invariant "
                         f"form of its {' and '.join(layers) + ' layers' if layers else 'layers'} (supported: "
                         f"{', '.join(BATCH_INVARIANT_ARCHITECTURES)})")
    if attention_backend not in (None, "batch_invariant"):
        raise ValueError(f"batch_invariant uses its own attention backend; attention_backend="
                         f"{attention_backend!r} cannot be combined with it")
    if layout.sliding_window is not None:
        raise ValueError(f"batch_invariant has no sliding-window attention; this {architecture} config windows "
                         f"its layers (sliding_window={layout.sliding_window})")
    if quantization is not None:
        raise ValueError(f"batch_invariant has no quantised linear layers; this engine would run "
                         f"quantization={quantization!r} (its GEMMs take unquantised weights)")
    if cpu_compile:
        raise ValueError("batch_invariant and cpu_compile cannot be combined: the compiled CPU forward "
                         "fuses and reorders the fixed-tile products batch invariance relies on")
    # Two ranks' partial sums add the same way in either order; three or more do not, and the
    # collective's order follows the message size.
    if tensor_parallel_size > 2:
        raise ValueError(f"batch_invariant supports tensor_parallel_size up to 2, got {tensor_parallel_size}")
