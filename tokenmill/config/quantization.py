"""How a model's linear weights are stored and multiplied: read once from the checkpoint's
`quantization_config` and the `quantization` engine argument (vLLM's `--quantization`), and
refused at start where tokenmill would compute something else than the checkpoint means.

Two fp8 forms (e4m3 weights, dynamic activation scales):

- **Block-FP8 checkpoints** (`{"quant_method": "fp8", "weight_block_size": [128, 128]}`:
  DeepSeek-V3/R1, Kimi-K2, MiniMax-M2, Qwen3 `-FP8`): each weight `[N, K]` is stored as
  float8_e4m3fn with `weight_scale_inv [ceil(N/bn), ceil(K/bk)]` (float32; the name is
  DeepSeek's: the weight is `fp8 * scale_inv`). Activations are quantised per token and group of
  `bk` input features at run time.
- **Online fp8** (`quantization="fp8"` on a bf16/fp16/fp32 checkpoint): every linear weight (and
  every routed expert) is quantised at load with one scale per output channel, except MoE routers
  (modules named `gate`); activations per token at run time.

Anything else (another `quant_method`, static activation scales, fp8 checkpoints without block
scales, e5m2, fp4 experts, ...) is refused with the field named: a checkpoint is never loaded as
if its weights were plain floats.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

QUANTIZATION_METHODS = ("fp8",)
# Keys of an fp8 `quantization_config` tokenmill reads; any other key is refused (it may change the math).
_FP8_KEYS = {"quant_method", "weight_block_size", "activation_scheme", "fmt", "modules_to_not_convert",
             "ignored_layers", "scale_fmt", "dequantize", "modules_to_convert", "expert_dtype"}
_E4M3_NAMES = ("e4m3", "float8_e4m3fn", "e4m3fn")
ONLINE_KEPT_MODULES = ("gate",)  # online fp8 keeps these unquantised (HF names; suffix match)


@dataclass(frozen=True)
class QuantizationConfig:
    """Args:
        method: "fp8" (the only one).
        weight_block_size: (bn, bk) for block-FP8 checkpoints; None for online per-channel fp8.
        from_checkpoint: the checkpoint stores fp8 weights and scales (else: quantised at load).
        modules_to_not_convert: HF module names (or patterns, HF's matching) kept unquantised.
        ue8m0_activation_scales: activation scales rounded up to powers of two (`scale_fmt:
            ue8m0`, DeepSeek-V3.1), as the model was trained.
    """

    method: str
    weight_block_size: tuple[int, int] | None
    from_checkpoint: bool
    modules_to_not_convert: tuple[str, ...] = ()
    ue8m0_activation_scales: bool = False

    def __post_init__(self) -> None:
        assert self.method in QUANTIZATION_METHODS
        if self.weight_block_size is not None:
            bn, bk = self.weight_block_size
            if bn < 1 or bk < 1:
                raise ValueError(f"quantization_config.weight_block_size must be positive, got {[bn, bk]}")
            if bk & (bk - 1) or bk < 16:
                # The GEMM's K tile is one block: a power of two, at least one tensor-core step.
                raise ValueError(f"quantization_config.weight_block_size[1] (the input-feature block, {bk}) "
                                 "must be a power of two >= 16")

    @property
    def block_fp8(self) -> bool:
        return self.weight_block_size is not None

    def describe(self) -> str:
        if self.block_fp8:
            bn, bk = self.weight_block_size
            return f"block-FP8 checkpoint ({bn}x{bk} weight blocks, dynamic per-token-group activations)"
        return "fp8 quantised at load (per-channel weight scales, dynamic per-token activations)"

    def keeps_unquantized(self, hf_module_name: str) -> bool:
        """Whether the checkpoint keeps module `hf_module_name` (e.g. `model.layers.0.mlp.gate`)
        unquantised, matched as HF transformers matches `modules_to_not_convert`: a pattern from
        the start up to a module boundary, as a regex with the same boundary, or as a suffix."""
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return any(re.match(rf"(?:{key}){boundary}", hf_module_name) or hf_module_name.endswith(key)
                   for key in self.modules_to_not_convert)


def resolve_quantization(hf_config: Any, requested: str | None) -> QuantizationConfig | None:
    """The quantisation a model runs with: its checkpoint's `quantization_config` (if any), checked
    against the `quantization` engine argument (None: whatever the checkpoint says)."""
    if requested is not None and requested not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or unset), "
                         f"got {requested!r}")
    raw = getattr(hf_config, "quantization_config", None)
    if raw is None:
        if requested is None:
            return None
        # Mixture-of-experts routers (`gate`) stay in the model dtype, as vLLM keeps them: their
        # weights are tiny, and their logits choose the experts.
        return QuantizationConfig(method=requested, weight_block_size=None, from_checkpoint=False,
                                  modules_to_not_convert=ONLINE_KEPT_MODULES)
    quant = _from_checkpoint(raw if isinstance(raw, dict) else raw.to_dict())
    if requested is not None and requested != quant.method:
        raise ValueError(f"quantization={requested!r} was asked for, but the checkpoint is quantised with "
                         f"quant_method {quant.method!r}")
    return quant


def _from_checkpoint(raw: dict) -> QuantizationConfig:
    method = raw.get("quant_method")
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"the checkpoint's quantization_config has quant_method {method!r}, which tokenmill "
                         f"does not support (supported: {', '.join(QUANTIZATION_METHODS)}); refusing to load "
                         "its weights as if they were unquantised")
    unknown = sorted(set(raw) - _FP8_KEYS)
    if unknown:
        raise ValueError(f"quantization_config field(s) {', '.join(unknown)} of quant_method 'fp8' are not "
                         "supported by tokenmill")

    def refuse(field: str, value: Any, why: str) -> None:
        raise ValueError(f"quantization_config.{field}={value!r} is not supported: {why}")

    scheme = str(raw.get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        refuse("activation_scheme", raw["activation_scheme"],
               "tokenmill computes activation scales at run time (dynamic); static input scales are not read")
    fmt = raw.get("fmt", "e4m3")
    if str(fmt).lower() not in _E4M3_NAMES:
        refuse("fmt", fmt, "fp8 weights must be e4m3 (float8_e4m3fn)")
    if raw.get("dequantize"):
        refuse("dequantize", raw["dequantize"], "it is HF transformers' load-time option; tokenmill runs fp8 "
               "weights as they are stored (drop the field)")
    if raw.get("modules_to_convert"):
        refuse("modules_to_convert", raw["modules_to_convert"], "fp8 embedding tables are not implemented")
    if raw.get("expert_dtype", "fp8") != "fp8":
        refuse("expert_dtype", raw["expert_dtype"], "only fp8 experts are implemented")
    scale_fmt = raw.get("scale_fmt") or "float"
    if scale_fmt not in ("float", "ue8m0"):
        refuse("scale_fmt", scale_fmt, "scales are float32 (float) or powers of two (ue8m0)")
    block = raw.get("weight_block_size")
    if block is None:
        refuse("weight_block_size", None, "fp8 checkpoints with per-tensor scales are not implemented; "
               "block-FP8 checkpoints ([128, 128] blocks) are")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) for b in block)):
        refuse("weight_block_size", block, "it must be two integers [bn, bk]")
    skip = raw.get("modules_to_not_convert")
    if skip is None:
        skip = raw.get("ignored_layers")  # MiniMax's name for the same list
    return QuantizationConfig(method="fp8", weight_block_size=(block[0], block[1]), from_checkpoint=True,
                              modules_to_not_convert=tuple(skip or ()),
                              ue8m0_activation_scales=scale_fmt == "ue8m0")
