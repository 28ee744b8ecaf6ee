"""`EngineArgs`: everything a user can set about an engine (vLLM's names), as `LLM(**kwargs)` or
CLI flags, and `create_engine_config()`, which checks every value once and returns the frozen
`EngineConfig` (`config/engine_config.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.config.engine_config import (
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from tokenmill.config.model_source import resolve_model_source
from tokenmill.config.parallel import head_partition

LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
SCHEDULING_POLICIES = ("fcfs", "priority")
# KV cache element types; "auto" stores K/V in the model dtype. fp8 is e4m3 with a per-layer scale.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_supports_bf16() -> bool:
    """bfloat16 only pays where the CPU has native bf16 dot products (AVX512-BF16 / AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, hf_config: Any, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if DTYPES[name] is not None:
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_supports_bf16() else torch.float32


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, device: torch.device,
                           attention_backend: str) -> torch.dtype:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {name!r}")
    if name == "auto":
        return model_dtype
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        raise ValueError(f"kv_cache_dtype={name!r} needs torch.float8_e4m3fn, which this torch "
                         f"({torch.__version__}) lacks")
    # Triton converts to/from e4m3 only on sm_89+ (Ada, Hopper and later).
    if device.type == "cuda" and attention_backend in ("triton", "batch_invariant"):
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 9):
            raise ValueError(f"kv_cache_dtype={name!r} with the triton backend needs a GPU of compute "
                             f"capability 8.9 or newer; this one is {capability[0]}.{capability[1]}")
    return fp8


@dataclass
class EngineArgs:
    """Everything a user can set about the engine (vLLM's names and meanings)."""

    model: str | None = None
    tokenizer: str | None = None
    served_model_name: str | None = None
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    block_size: int = 16
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    scheduling_policy: str = "fcfs"
    tensor_parallel_size: int = 1
    device: str = "auto"
    attention_backend: str | None = None
    enforce_eager: bool = False
    num_gpu_blocks_override: int | None = None
    # None: on where it pays (CUDA, whose kernels run behind the host), off on CPU.
    async_scheduling: bool | None = None
    kv_cache_dtype: str = "auto"  # "auto" (the model dtype) or "fp8" / "fp8_e4m3"
    disable_cascade_attn: bool = False
    # GPU kernel switches (docs/gpu.md): all on by default, each off for measurement or a workaround.
    triton_gemv: bool = True
    disable_custom_all_reduce: bool = False
    fused_all_reduce_norm: bool = True
    fused_all_reduce_max_world_size: int = 4
    # RL rollouts (docs/rl.md).
    enable_sleep_mode: bool = False
    worker_extension_cls: str | None = None
    batch_invariant: bool = False

    # ----- CLI -----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, with_model: bool = True) -> argparse.ArgumentParser:
        d = EngineArgs()
        if with_model:
            parser.add_argument("--model", default=None,
                                help="GGUF file, HF folder, or a shipped shape name (default: embedded SmolLM2-135M-Instruct)")
        parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        parser.add_argument("--served-model-name", default=None)
        parser.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format)
        parser.add_argument("--dtype", choices=list(DTYPES), default=d.dtype)
        parser.add_argument("--seed", type=int, default=d.seed)
        parser.add_argument("--max-model-len", type=int, default=None)
        parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
        parser.add_argument("--max-num-batched-tokens", type=int, default=None)
        parser.add_argument("--block-size", type=int, default=d.block_size)
        parser.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV pool")
        parser.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                            default=d.enable_prefix_caching)
        parser.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default=d.scheduling_policy)
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                            help="ranks (GPUs, or CPU processes) to split the model over")
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device)
        parser.add_argument("--attention-backend", choices=("torch_native", "triton", "batch_invariant"),
                            default=None, help="default: triton on CUDA, torch_native on CPU, "
                                               "batch_invariant with --batch-invariant")
        parser.add_argument("--enforce-eager", action="store_true")
        parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                            help="prepare and launch the next step while the GPU runs this one "
                                 "(default: on for CUDA, off on CPU)")
        parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                            help="KV cache element type: auto (the model dtype) or fp8 (e4m3, half "
                                 "the bytes, scale 1.0)")
        parser.add_argument("--disable-cascade-attn", action="store_true",
                            help="never attend a prefix shared by a whole decode batch once for all "
                                 "of it (cascade attention, Triton backend; on by default)")
        parser.add_argument("--triton-gemv", action=argparse.BooleanOptionalAction, default=d.triton_gemv,
                            help="batch-1 decode graphs use the Triton GEMV instead of cuBLAS (CUDA)")
        parser.add_argument("--disable-custom-all-reduce", action="store_true",
                            help="tensor parallel on GPUs: every all-reduce through NCCL (no one-shot "
                                 "symmetric-memory all-reduce, no fused all-reduce + RMSNorm)")
        parser.add_argument("--fused-all-reduce-norm", action=argparse.BooleanOptionalAction,
                            default=d.fused_all_reduce_norm,
                            help="tensor parallel on GPUs: decode's all-reduce, residual add and next "
                                 "RMSNorm in one kernel")
        parser.add_argument("--fused-all-reduce-max-world-size", type=int,
                            default=d.fused_all_reduce_max_world_size,
                            help="use the fused all-reduce + RMSNorm kernel up to this many ranks")
        parser.add_argument("--enable-sleep-mode", action="store_true",
                            help="allow sleep/wake_up, which hand the device memory back (the server "
                                 "also serves POST /sleep, /wake_up and GET /is_sleeping)")
        parser.add_argument("--worker-extension-cls", default=None,
                            help="pkg.module.Class whose methods are mixed into every rank's worker, "
                                 "callable through collective_rpc")
        parser.add_argument("--batch-invariant", action="store_true",
                            help="a request's tokens do not depend on what else is batched with it "
                                 "(fixed-order matmuls, norms and attention; slower; docs/rl.md)")
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    # ----- resolution -----
    def create_engine_config(self) -> EngineConfig:
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.scheduling_policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.block_size not in (1, 2, 4, 8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be a power of two up to 128, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        device = torch.device(_default_device() if self.device == "auto" else self.device)
        if device.type == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs as many GPUs; "
                             f"{torch.cuda.device_count()} visible")
        source = resolve_model_source(self.model, self.load_format, self.tokenizer)
        hf_config = source.load_hf_config()
        architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
        dtype = resolve_dtype(self.dtype, hf_config, device)
        attention_backend = self.attention_backend or ("triton" if device.type == "cuda" else "torch_native")
        if self.batch_invariant:
            _check_batch_invariant(self, architecture)
            attention_backend = "batch_invariant"
        elif attention_backend == "batch_invariant":
            raise ValueError("attention_backend='batch_invariant' is part of --batch-invariant: set batch_invariant")
        kv_cache_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype, dtype, device, attention_backend)
        if self.tensor_parallel_size > 1:
            _check_tensor_parallel_split(hf_config, self.tensor_parallel_size)
        model_max = (getattr(hf_config, "max_position_embeddings", None) or 2048)
        max_model_len = self.max_model_len or model_max
        if max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        # GPUs: 8192, vLLM's serving default; fewer, larger prefill chunks paid off on the H100 (a
        # 256 x 256/256 batch: 1.8 s at 8192 against 2.6 s at 2048, docs/perf.md). CPUs: small
        # chunks, so running requests keep decoding between the slow prefill chunks.
        max_batched = self.max_num_batched_tokens or (
            8192 if device.type == "cuda" else max(2048, min(max_model_len, 8192)))
        if max_batched < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        model_cfg = ModelConfig(
            model=self.model or source.display_name, source=source, hf_config=hf_config,
            architecture=architecture, dtype=dtype, max_model_len=max_model_len,
            served_model_name=self.served_model_name or source.display_name, seed=self.seed,
            enable_sleep_mode=self.enable_sleep_mode)
        if self.fused_all_reduce_max_world_size < 1:
            raise ValueError("fused_all_reduce_max_world_size must be >= 1")
        kernels = KernelConfig(
            attention_backend=attention_backend,
            enforce_eager=self.enforce_eager or device.type != "cuda",
            cascade_attention=attention_backend == "triton" and not self.disable_cascade_attn,
            # Batch-invariant: no kernel whose use depends on the batch (the batch-1 GEMV, the
            # fused all-reduce + norm of small decode batches).
            triton_gemv=self.triton_gemv and not self.batch_invariant,
            custom_all_reduce=not self.disable_custom_all_reduce,
            fused_all_reduce_norm=self.fused_all_reduce_norm and not self.batch_invariant,
            fused_all_reduce_max_world_size=self.fused_all_reduce_max_world_size,
            batch_invariant=self.batch_invariant,
        )
        return EngineConfig(
            model=model_cfg,
            cache=CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                              self.enable_prefix_caching, self.num_gpu_blocks_override, kv_cache_dtype),
            scheduler=SchedulerConfig(self.max_num_seqs, max_batched, self.scheduling_policy, max_model_len,
                                      device.type == "cuda" if self.async_scheduling is None
                                      else self.async_scheduling),
            parallel=ParallelConfig(self.tensor_parallel_size, self.worker_extension_cls),
            device=device,
            load_format=source.load_format,
            kernels=kernels,
            engine_args=dataclasses.replace(self),
        )


# Model families whose every layer has a batch-invariant form (docs/rl.md); others are refused.
BATCH_INVARIANT_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def _check_batch_invariant(args: EngineArgs, architecture: str) -> None:
    """Refuse what batch-invariant mode cannot honour (docs/rl.md)."""
    if architecture not in BATCH_INVARIANT_ARCHITECTURES:
        raise ValueError(f"batch_invariant is not implemented for {architecture} (supported: "
                         f"{', '.join(BATCH_INVARIANT_ARCHITECTURES)})")
    if args.attention_backend not in (None, "batch_invariant"):
        raise ValueError(f"batch_invariant uses its own attention backend; attention_backend="
                         f"{args.attention_backend!r} cannot be combined with it")
    # Two ranks' partial sums add the same way in either order; three or more do not, and the
    # collective's order follows the message size.
    if args.tensor_parallel_size > 2:
        raise ValueError(f"batch_invariant supports tensor_parallel_size up to 2, got {args.tensor_parallel_size}")


def _check_tensor_parallel_split(hf_config: Any, tp: int) -> None:
    """Refuse a split the layers cannot make, before any worker process starts."""
    heads = hf_config.num_attention_heads
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    for rank in range(tp):
        head_partition(heads, kv_heads, tp, rank)  # raises ValueError with the reason
    intermediate = getattr(hf_config, "intermediate_size", None)
    if intermediate is not None and intermediate % tp:
        raise ValueError(f"the MLP's intermediate size ({intermediate}) is not divisible by "
                         f"tensor_parallel_size ({tp})")


def engine_args_from_kwargs(model: str | None, **kwargs: Any) -> EngineArgs:
    """Build EngineArgs from `LLM(...)` keyword arguments, naming any unknown one."""
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
    return EngineArgs(model=model, **kwargs)
