"""The frozen configuration an engine runs with, built once by `EngineArgs.create_engine_config()`.

Every switch that changes what runs (kernels included) is a field here, read when the part it
configures is built; nothing reads environment variables or mutates a config after start-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from tokenmill.config.attention_layout import AttentionLayout, attention_layout
from tokenmill.config.model_source import ModelSource
from tokenmill.config.pooling import PoolingConfig
from tokenmill.config.quantization import QuantizationConfig

TASKS = ("generate", "embed")


@dataclass(frozen=True)
class ModelConfig:
    model: str  # what the user named (path, shape name, or the default)
    source: ModelSource  # where weights, config and tokenizer come from
    hf_config: Any  # a transformers PretrainedConfig
    architecture: str
    dtype: torch.dtype
    max_model_len: int
    served_model_name: str
    seed: int
    task: str = "generate"  # "generate" (a decoder, paged KV cache) or "embed" (an encoder, pooled)
    pooling: PoolingConfig | None = None  # embed: how hidden states become one vector
    # A chat template that replaces the tokenizer's (`--chat-template`), as text.
    chat_template: str | None = None
    # Sampling defaults for requests that leave a field unset (`--generation-config`).
    sampling_defaults: dict = field(default_factory=dict)
    max_logprobs: int = 20  # most top logprobs a request may ask for (`--max-logprobs`)
    # How linear weights are stored and multiplied (fp8); None: in `dtype`, unquantised.
    quantization: QuantizationConfig | None = None
    # `sleep()` may hand the device memory back (docs/rl.md); off, sleep is refused.
    enable_sleep_mode: bool = False

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.hf_config.num_attention_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or (
            self.hf_config.hidden_size // self.hf_config.num_attention_heads)

    @cached_property
    def attention_layout(self) -> AttentionLayout:
        """Each decoder layer's attention kind and the sliding window (config/attention_layout.py)."""
        return attention_layout(self.hf_config, self.architecture)

    @property
    def is_encoder(self) -> bool:
        """Bidirectional attention over the prompt only: no KV cache, no decoding."""
        return self.task == "embed"


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    kv_cache_memory: int | None  # bytes for the KV pool; None: derived (GPU: gpu_memory_utilization)
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    num_gpu_blocks_override: int | None = None
    # Element type of the paged K/V; None: the model dtype. float8_e4m3fn halves the pool's bytes.
    kv_cache_dtype: torch.dtype | None = None
    # Every layer with a KV cache slides over this many tokens: blocks wholly behind the window of
    # a request's next query are freed (None: some layer reads the whole context).
    sliding_window: int | None = None
    # Hybrid models (linear-attention layers): recurrent-state slots, one per running request, the
    # rest holding prefix-cache checkpoints of the state (0: the model keeps no state).
    num_state_slots: int = 0
    # Prefix caching on a hybrid model: the state is checkpointed every this many tokens (a
    # multiple of block_size), and a cached prefix is reused up to its last checkpoint.
    state_checkpoint_interval: int = 0

    @property
    def pool_size_given(self) -> bool:
        """Whether the user sized the KV pool (blocks or bytes) rather than leaving it to free memory."""
        return bool(self.num_gpu_blocks_override or self.kv_cache_memory)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    scheduling_policy: str
    max_model_len: int
    # Schedule and launch step N+1 before step N's sampled tokens reach the host (docs/gpu.md).
    async_scheduling: bool = False
    # Prompts run whole in one step (encoders: bidirectional attention cannot be chunked).
    chunked_prefill: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    # "pkg.module.Class" whose methods are mixed into every rank's worker, for collective_rpc.
    worker_extension_cls: str | None = None


@dataclass(frozen=True)
class KernelConfig:
    """Which implementation each part runs; chosen once, when that part is built."""

    attention_backend: str = "torch_native"  # "torch_native" (reference), "cpu" or "triton" (CUDA)
    enforce_eager: bool = True  # no CUDA graphs
    # CPU: the forward pass compiled by inductor (worker/cpu_compile.py; needs the "cpu" backend).
    cpu_compile: bool = False
    # The cpu backend's decode attention through the C++ kernel that reads the paged cache in place
    # (ops/cpu_paged_decode.py), greedy picks through the C++ argmax (ops/cpu_argmax.py) and one-row
    # bf16 linears through the C++ GEMV (ops/cpu_gemv.py), where they build on this machine
    # (ops/cpu_extension.py); else gather + SDPA, torch.argmax and oneDNN.
    cpu_native_decode: bool = False
    # GGUF block type kept quantised in every linear layer ("Q4_0", "Q4_1", "Q8_0"; CPU,
    # `quantization="gguf"`); None: GGUF weights are dequantised to the model dtype at load.
    gguf_weight_type: str | None = None
    # Those GGUF weights multiply activations rounded to int8 per block of 32 with integer dot
    # products (ops/cpu_quant_matmul.py, where the CPU has AVX512-VNNI); else PyTorch's weight-only
    # kernels on float activations (ops/gguf_blocks.py).
    gguf_int8_activations: bool = True
    # With them: the block type of the token embedding (and LM head), kept quantised too where
    # that kernel runs (model/layers/vocab_embedding.quantized_table_type); None: the table is
    # dequantised to the model dtype at load.
    gguf_embedding_type: str | None = None
    # Decode steps whose requests share a long prefix attend it once for the batch (Triton only).
    cascade_attention: bool = False
    # The Triton GEMV for one-row products inside the decode CUDA graphs (cuBLAS otherwise).
    triton_gemv: bool = True
    # The decode chain's Triton kernels (GEMVs, norms, rope + cache write, decode attention) launch
    # dependent on the kernel before, overlapping each one's start with its predecessor's end
    # (programmatic dependent launch, Hopper and later; ops/pdl.py; ignored elsewhere).
    pdl: bool = True
    # fp8 linears: products of many tokens through cuBLAS's scaled fp8 GEMM (`torch._scaled_mm`
    # with row-wise or DeepSeek's 1x128 / 128x128 block scales) where this torch and GPU take them.
    cublas_fp8: bool = True
    # Tensor parallel on GPUs: the one-shot symmetric-memory all-reduce for small sums (NCCL otherwise).
    custom_all_reduce: bool = True
    # ... and the all-reduce, residual add and next RMSNorm in one kernel at decode (with the one above).
    fused_all_reduce_norm: bool = True
    # The fused kernel is used up to this many ranks (measured faster up to 4; see docs/scale-out.md).
    fused_all_reduce_max_world_size: int = 4
    # A request's tokens do not depend on what else is in its batch (docs/rl.md): fixed-order
    # matmuls, norms and attention, chosen when the layers are built.
    batch_invariant: bool = False


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    load_format: str
    kernels: KernelConfig = KernelConfig()
    # The `EngineArgs` the config was built from: tensor-parallel worker processes rebuild it from them.
    engine_args: Any = field(default=None, compare=False, repr=False)
