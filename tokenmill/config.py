"""Engine configuration: user-facing `EngineArgs` (vLLM's names) and the frozen `EngineConfig`.

`EngineArgs` is what a user or the CLI sets; `create_engine_config()` resolves the model, reads its
config, checks every value once and returns frozen configs. Nothing mutates a config afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from tokenmill.config_kv_sizing import fit_cpu_max_model_len, kv_bytes_per_token, total_memory_bytes
from tokenmill.config_model_flags import MAX_LOGPROBS_LIMIT
from tokenmill.model.loader.model_source import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
SCHEDULING_POLICIES = ("fcfs", "priority")
# KV cache element types; "auto" stores K/V in the model dtype. fp8 is e4m3 with a per-layer scale.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


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
    # A chat template that replaces the tokenizer's (`--chat-template`), as text.
    chat_template: str | None = None
    # Sampling defaults for requests that leave a field unset (`--generation-config`).
    sampling_defaults: dict = field(default_factory=dict)
    max_logprobs: int = MAX_LOGPROBS_LIMIT

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


@dataclass(frozen=True)
class CacheConfig:
    block_size: int
    kv_cache_memory: int | None  # bytes for the KV pool; None: derived (GPU: gpu_memory_utilization)
    gpu_memory_utilization: float
    enable_prefix_caching: bool
    num_gpu_blocks_override: int | None = None
    # Element type of the paged K/V; None: the model dtype. float8_e4m3fn halves the pool's bytes.
    kv_cache_dtype: torch.dtype | None = None

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


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    device: torch.device
    load_format: str
    attention_backend: str
    enforce_eager: bool
    # Decode steps whose requests share a long prefix attend it once for the batch (Triton only).
    cascade_attention: bool = False
    # What the config was built from: tensor-parallel worker processes rebuild it from these.
    engine_args: "EngineArgs | None" = field(default=None, compare=False, repr=False)


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
    if device.type == "cuda" and attention_backend == "triton":
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
    # vLLM's model flags (docs/cli.md says how each applies when nothing is downloaded).
    chat_template: str | None = None  # a file, or the template itself
    generation_config: str = "auto"  # "auto" (the model's generation_config.json), "vllm", or a folder
    max_logprobs: int = MAX_LOGPROBS_LIMIT
    quantization: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None
    download_dir: str | None = None

    # ----- CLI -----
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser, with_model: bool = True) -> argparse.ArgumentParser:
        d = EngineArgs()
        if with_model:
            parser.add_argument("--model", default=None,
                                help="GGUF file, HF folder, or a shipped shape name (default: embedded SmolLM2-135M-Instruct)")
        parser.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
        parser.add_argument("--served-model-name", default=None,
                            help="the model name the API reports and accepts (default: from the model)")
        parser.add_argument("--load-format", choices=LOAD_FORMATS, default=d.load_format,
                            help="auto: by what --model is; dummy: random weights at the model's shape")
        parser.add_argument("--dtype", choices=list(DTYPES), default=d.dtype,
                            help="weights and activations; auto: bfloat16 where the CPU/GPU has fast bf16, else float32")
        parser.add_argument("--seed", type=int, default=d.seed,
                            help="engine seed (dummy weights, sampling without a per-request seed)")
        parser.add_argument("--max-model-len", type=int, default=None,
                            help="context length, prompt + output (default: the model's; on a CPU, what the "
                                 "default KV pool holds once)")
        parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs,
                            help="most requests running at once")
        parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                            help="token budget per step; longer prompts are chunked (default: 8192 on "
                                 "CUDA; max(2048, min(max_model_len, 8192)) on a CPU)")
        parser.add_argument("--block-size", type=int, default=d.block_size,
                            help="tokens per KV-cache block")
        parser.add_argument("--kv-cache-memory", type=int, default=None,
                            help="bytes for the KV pool (default: on a GPU what --gpu-memory-utilization "
                                 "leaves; on a CPU sized from the model, max_model_len, max_num_seqs and "
                                 "the memory available, see docs/cli.md)")
        parser.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization,
                            help="this engine's share of the GPU for weights, activations and KV cache")
        parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                            default=d.enable_prefix_caching,
                            help="reuse the KV blocks of identical prompt prefixes")
        parser.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default=d.scheduling_policy,
                            help="fcfs, or priority (lower first)")
        parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=d.tensor_parallel_size,
                            help="ranks (GPUs, or CPU processes) to split the model over")
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                            help="auto: CUDA when a GPU is visible, else the CPU")
        parser.add_argument("--attention-backend", choices=("torch_native", "triton"), default=None,
                            help="default: triton on CUDA, torch_native on the CPU")
        parser.add_argument("--enforce-eager", action="store_true",
                            help="no CUDA graphs (the CPU always runs eagerly)")
        parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                            help="prepare and launch the next step while the GPU runs this one "
                                 "(default: on for CUDA, off on CPU)")
        parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                            help="KV cache element type: auto (the model dtype) or fp8 (e4m3, half "
                                 "the bytes, scale 1.0)")
        parser.add_argument("--disable-cascade-attn", action="store_true",
                            help="never attend a prefix shared by a whole decode batch once for all "
                                 "of it (cascade attention, Triton backend; on by default)")
        from tokenmill.config_model_flags import add_vllm_model_args

        add_vllm_model_args(parser)
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
        from tokenmill import config_model_flags as flags
        from tokenmill.gguf_cache import use_cached_conversion

        flags.check_vllm_model_args(self)
        source = resolve_model_source(self.model, self.load_format, self.tokenizer)
        flags.check_quantization(self.quantization, source)
        source = use_cached_conversion(source)  # a GGUF is read from its converted copy after the first start
        hf_config = source.load_hf_config()
        source = flags.with_dummy_tokenizer(source, hf_config)
        architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
        dtype = resolve_dtype(self.dtype, hf_config, device)
        attention_backend = self.attention_backend or ("triton" if device.type == "cuda" else "torch_native")
        kv_cache_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype, dtype, device, attention_backend)
        if self.tensor_parallel_size > 1:
            _check_tensor_parallel_split(hf_config, self.tensor_parallel_size)
        model_max = (getattr(hf_config, "max_position_embeddings", None) or 2048)
        max_model_len = self.max_model_len or model_max
        if (self.max_model_len is None and device.type == "cpu" and not self.kv_cache_memory
                and not self.num_gpu_blocks_override):
            # The default CPU KV pool is a share of the machine's memory (config_kv_sizing.py); a
            # context it cannot hold once would make the engine refuse to start.
            element = torch.empty((), dtype=kv_cache_dtype).element_size()
            per_token = kv_bytes_per_token(
                hf_config.num_hidden_layers,
                getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
                getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
                element) // self.tensor_parallel_size
            max_model_len, note = fit_cpu_max_model_len(
                model_max, per_token, total_memory_bytes() // self.tensor_parallel_size)
            if note:
                logger.info("%s", note)
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
            chat_template=flags.read_chat_template(self.chat_template),
            sampling_defaults=flags.sampling_defaults(self.generation_config, source),
            max_logprobs=self.max_logprobs)
        return EngineConfig(
            model=model_cfg,
            cache=CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                              self.enable_prefix_caching, self.num_gpu_blocks_override, kv_cache_dtype),
            scheduler=SchedulerConfig(self.max_num_seqs, max_batched, self.scheduling_policy, max_model_len,
                                      device.type == "cuda" if self.async_scheduling is None
                                      else self.async_scheduling),
            parallel=ParallelConfig(self.tensor_parallel_size),
            device=device,
            load_format=source.load_format,
            attention_backend=attention_backend,
            enforce_eager=self.enforce_eager or device.type != "cuda",
            cascade_attention=attention_backend == "triton" and not self.disable_cascade_attn,
            # max_model_len as resolved here: the engine core and tensor-parallel ranks rebuild the
            # config from these and must not resolve the CPU default again (another process, another
            # cgroup limit).
            engine_args=dataclasses.replace(self, max_model_len=max_model_len),
        )


def _check_tensor_parallel_split(hf_config: Any, tp: int) -> None:
    """Refuse a split the layers cannot make, before any worker process starts."""
    from tokenmill.model.layers.linear import head_partition

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


__all__ = ["EngineArgs", "EngineConfig", "ModelConfig", "CacheConfig", "SchedulerConfig",
           "ParallelConfig", "engine_args_from_kwargs", "field"]
