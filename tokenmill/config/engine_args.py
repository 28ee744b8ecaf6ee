"""`EngineArgs`: everything a user can set about an engine (vLLM's names), as `LLM(**kwargs)` or
CLI flags, and `create_engine_config()`, which checks every value once and returns the frozen
`EngineConfig` (`config/engine_config.py`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.config.engine_config import (
    TASKS,
    CacheConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from tokenmill.config.attention_layout import attention_layout
from tokenmill.config.batch_invariant import check_batch_invariant
from tokenmill.config.model_checks import check_model_config
from tokenmill.config.kv_sizing import fit_cpu_max_model_len, kv_bytes_per_token, total_memory_bytes
from tokenmill.config.model_flags import (
    MAX_LOGPROBS_LIMIT,
    add_vllm_model_args,
    check_vllm_model_args,
    read_chat_template,
    sampling_defaults,
)
from tokenmill.config.dummy_tokenizer import with_dummy_tokenizer
from tokenmill.config.gguf_cache import use_cached_conversion
from tokenmill.config.model_source import (
    ENCODER_ARCHITECTURES,
    is_embedding_model,
    resolve_embedding_source,
    resolve_model_source,
)
from tokenmill.config.parallel import divide, head_partition
from tokenmill.config.pooling import PoolingConfig, trained_max_len
from tokenmill.config.quantization import QUANTIZATION_METHODS, resolve_quantization

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "gguf", "safetensors", "dummy")
DTYPES = {"auto": None, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "half": torch.float16}
SCHEDULING_POLICIES = ("fcfs", "priority")
# KV cache element types; "auto" stores K/V in the model dtype. fp8 is e4m3 with a per-layer scale.
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
# Weight formats run from their own blocks rather than through config/quantization.py.
QUANTIZATIONS = ("gguf",)
# Sequences a decoder runs at once unless --max-num-seqs says otherwise (vLLM's default).
DEFAULT_MAX_NUM_SEQS = 256
# State checkpoints end a block of the lightning-attention scan, whose blocks are at least 16 tokens.
STATE_CHECKPOINT_ALIGNMENT = 16


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
    max_num_seqs: int | None = None  # None: DEFAULT_MAX_NUM_SEQS for generation; no cap beyond the token budget for embeddings
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
    # Linear weights' format: None (the checkpoint's: its quantization_config, else unquantised),
    # "fp8" (an unquantised checkpoint quantised at load; docs/quantization.md) or "gguf" (a GGUF
    # file's Q4_0/Q4_1/Q8_0 weights stay in their blocks, CPU; docs/perf-cpu.md).
    quantization: str | None = None
    disable_cascade_attn: bool = False
    # GPU kernel switches (docs/gpu.md): all on by default, each off for measurement or a workaround.
    triton_gemv: bool = True
    pdl: bool = True
    cublas_fp8: bool = True
    disable_custom_all_reduce: bool = False
    fused_all_reduce_norm: bool = True
    fused_all_reduce_max_world_size: int = 4
    # "generate" (a decoder), "embed" (an embedding model: pooled vectors, no decoding) or "auto"
    # (embed when `model` is an embedding model's folder).
    task: str = "generate"
    # The engine answers requests as they arrive (`tokenmill serve`): on a CPU, steps stay short.
    serving: bool = False
    # vLLM's model flags (docs/cli.md says how each applies when nothing is downloaded).
    chat_template: str | None = None  # a file, or the template itself
    generation_config: str = "auto"  # "auto" (the model's generation_config.json), "vllm", or a folder
    max_logprobs: int = MAX_LOGPROBS_LIMIT
    trust_remote_code: bool = False
    revision: str | None = None
    download_dir: str | None = None
    # CPU: compile the forward pass with inductor (worker/cpu_compile.py). Off unless asked: every
    # start-up compiles for minutes on a 2-core machine, and it needs a C++ compiler at run time.
    cpu_compile: bool = False
    # CPU backend: decode attention reads the paged cache in place, greedy picks take the argmax and
    # one-row bf16 linears the GEMV, with C++ kernels built once per machine (ops/cpu_extension.py);
    # off: the blocks are gathered and SDPA attends them, torch.argmax picks, oneDNN multiplies.
    cpu_native_decode: bool = True
    # quantization="gguf": activations rounded to int8 per block of 32 and multiplied with integer
    # dot products (llama.cpp's arithmetic; AVX512-VNNI); off: float activations, exact weights.
    gguf_int8_activations: bool = True
    # Hybrid (linear-attention) models with prefix caching: checkpoint the recurrent state every
    # this many tokens (a multiple of block_size); a cached prefix is reused up to a checkpoint.
    state_checkpoint_interval: int = 512
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
                            help="most requests running at once (default 256)")
        parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                            help="token budget per step; longer prompts are chunked (default: 8192 on "
                                 "CUDA, smaller on a CPU; see docs/server.md)")
        parser.add_argument("--block-size", type=int, default=d.block_size,
                            help="tokens per KV-cache block")
        parser.add_argument("--kv-cache-memory", type=int, default=None,
                            help="bytes for the KV pool (default: on a GPU what --gpu-memory-utilization "
                                 "leaves; on a CPU sized from the model, max_model_len, max_num_seqs and "
                                 "the machine's memory, see docs/cli.md)")
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
        parser.add_argument("--attention-backend", choices=("torch_native", "cpu", "triton", "batch_invariant"),
                            default=None, help="default: triton on CUDA, torch_native on the CPU (cpu with "
                                               "--cpu-compile), batch_invariant with --batch-invariant")
        parser.add_argument("--enforce-eager", action="store_true",
                            help="no CUDA graphs (the CPU always runs eagerly)")
        parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                            help="prepare and launch the next step while the GPU runs this one "
                                 "(default: on for CUDA, off on CPU)")
        parser.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=d.kv_cache_dtype,
                            help="KV cache element type: auto (the model dtype) or fp8 (e4m3, half "
                                 "the bytes, scale 1.0)")
        parser.add_argument("--quantization", "-q", choices=QUANTIZATION_METHODS + QUANTIZATIONS, default=None,
                            help="weight format: fp8 quantises an unquantised checkpoint at load "
                                 "(per-channel weight scales, dynamic per-token activation scales); "
                                 "gguf keeps a GGUF file's Q4_0/Q4_1/Q8_0 linear weights in their "
                                 "blocks (one CPU rank; otherwise they are dequantised at load); "
                                 "default: the checkpoint's quantization_config (block-FP8 checkpoints "
                                 "load as fp8 either way)")
        parser.add_argument("--disable-cascade-attn", action="store_true",
                            help="never attend a prefix shared by a whole decode batch once for all "
                                 "of it (cascade attention, Triton backend; on by default)")
        parser.add_argument("--triton-gemv", action=argparse.BooleanOptionalAction, default=d.triton_gemv,
                            help="batch-1 decode graphs use the Triton GEMV instead of cuBLAS (CUDA)")
        parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=d.pdl,
                            help="decode kernels (GEMVs, norms, rope, attention) launch dependent on the "
                                 "kernel before, each starting as the previous one ends (Hopper and later)")
        parser.add_argument("--cublas-fp8", action=argparse.BooleanOptionalAction,
                            default=d.cublas_fp8,
                            help="fp8 linears multiply batches of many tokens through cuBLAS's scaled fp8 "
                                 "GEMM where this torch takes their scales (else the Triton kernel)")
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
        add_vllm_model_args(parser, d)
        parser.add_argument("--cpu-compile", action="store_true",
                            help="CPU: compile the forward pass with inductor (faster steps; the first "
                                 "start-up compiles for minutes, later ones reuse the on-disk cache)")
        parser.add_argument("--cpu-native-decode", action=argparse.BooleanOptionalAction,
                            default=d.cpu_native_decode,
                            help="CPU backend (--cpu-compile): decode attention reads the paged KV cache in "
                                 "place, greedy picks take the argmax and batch-1 linears the GEMV, with C++ "
                                 "kernels built on first use (off: gather + SDPA, torch.argmax, oneDNN)")
        parser.add_argument("--gguf-int8-activations", action=argparse.BooleanOptionalAction,
                            default=d.gguf_int8_activations,
                            help="--quantization gguf: activations are rounded to int8 per block of 32 and "
                                 "multiplied by the 4/8-bit weights with integer dot products (AVX512-VNNI; "
                                 "as llama.cpp does); off: PyTorch's weight-only kernels on float activations "
                                 "(exact to the weights, slower)")
        parser.add_argument("--state-checkpoint-interval", type=int, default=d.state_checkpoint_interval,
                            help="hybrid linear-attention models with prefix caching: tokens between "
                                 "checkpoints of the recurrent state (a multiple of --block-size)")
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
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        device = torch.device(_default_device() if self.device == "auto" else self.device)
        if device.type == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size {self.tensor_parallel_size} needs as many GPUs; "
                             f"{torch.cuda.device_count()} visible")
        task = self.task
        if task == "auto":
            task = "embed" if is_embedding_model(self.model) else "generate"
        if task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)} or auto, got {self.task!r}")
        check_vllm_model_args(self)
        if task == "embed":
            return self._create_embedding_config(device)
        source = resolve_model_source(self.model, self.load_format, self.tokenizer)
        if self.quantization != "gguf":  # (kept in its blocks, a GGUF is read from the file itself)
            source = use_cached_conversion(source)  # a GGUF is read from its converted copy after the first start
        hf_config = source.load_hf_config()
        source = with_dummy_tokenizer(source, hf_config)
        architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
        check_model_config(hf_config, architecture)
        dtype = resolve_dtype(self.dtype, hf_config, device)
        cpu_compile = _resolve_cpu_compile(self.cpu_compile, device, self.tensor_parallel_size, self.enforce_eager,
                                           self.attention_backend)
        attention_backend = self.attention_backend or (
            "triton" if device.type == "cuda" else "cpu" if cpu_compile else "torch_native")
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS + QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS + QUANTIZATIONS)} "
                             f"(or unset), got {self.quantization!r}")
        quantization = resolve_quantization(hf_config, None if self.quantization in QUANTIZATIONS else self.quantization)
        if self.batch_invariant:
            check_batch_invariant(architecture, hf_config, attention_layout(hf_config, architecture),
                                  self.attention_backend,
                                  "gguf" if self.quantization == "gguf" else quantization and quantization.method,
                                  self.cpu_compile, self.tensor_parallel_size)
            attention_backend = "batch_invariant"
        elif attention_backend == "batch_invariant":
            raise ValueError("attention_backend='batch_invariant' is part of --batch-invariant: set batch_invariant")
        kv_cache_dtype = resolve_kv_cache_dtype(self.kv_cache_dtype, dtype, device, attention_backend)
        if self.tensor_parallel_size > 1:
            _check_tensor_parallel_split(hf_config, self.tensor_parallel_size)
            if attention_layout(hf_config, architecture).is_hybrid:
                divide(hf_config.num_attention_heads, self.tensor_parallel_size, "linear-attention heads")
        model_max = (getattr(hf_config, "max_position_embeddings", None) or 2048)
        max_model_len = self.max_model_len or model_max
        if (self.max_model_len is None and device.type == "cpu" and not self.kv_cache_memory
                and not self.num_gpu_blocks_override):
            # The default CPU KV pool is a share of the machine's memory (config/kv_sizing.py); a
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
        # 256 x 256/256 batch: 1.8 s at 8192 against 2.6 s at 2048, docs/perf.md). A CPU serving
        # requests: 128, so no step runs much over a second (the last chunk of an 8k prompt of the
        # default model takes ~0.6 s on one core, 256 ~1.4 s) and running requests decode between
        # chunks (docs/reliability.md, benchmarks/cpu_prefill_steps.py). A CPU running a batch
        # offline: larger chunks, fewer steps (nobody waits on one request).
        if device.type == "cuda":
            default_batched = 8192
        else:
            default_batched = 128 if self.serving else max(2048, min(max_model_len, 8192))
        max_batched = self.max_num_batched_tokens or default_batched
        if max_batched < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        model_cfg = ModelConfig(
            model=self.model or source.display_name, source=source, hf_config=hf_config,
            architecture=architecture, dtype=dtype, max_model_len=max_model_len,
            served_model_name=self.served_model_name or source.display_name, seed=self.seed,
            quantization=quantization, chat_template=read_chat_template(self.chat_template),
            sampling_defaults=sampling_defaults(self.generation_config, source), max_logprobs=self.max_logprobs,
            enable_sleep_mode=self.enable_sleep_mode)
        if self.fused_all_reduce_max_world_size < 1:
            raise ValueError("fused_all_reduce_max_world_size must be >= 1")
        kernels = KernelConfig(
            attention_backend=attention_backend,
            enforce_eager=self.enforce_eager or device.type != "cuda",
            # (Latent attention has no cascade form: its decodes read one shared row per token. A
            # sliding window cuts each request's context at its own point: no prefix is shared.)
            cascade_attention=(attention_backend == "triton" and not self.disable_cascade_attn
                               and not getattr(hf_config, "kv_lora_rank", None)
                               and model_cfg.attention_layout.sliding_window is None),
            # Batch-invariant: no kernel whose use depends on the batch (the batch-1 GEMV, the
            # fused all-reduce + norm of small decode batches).
            triton_gemv=self.triton_gemv and not self.batch_invariant,
            pdl=self.pdl,
            cublas_fp8=self.cublas_fp8 and not self.batch_invariant,
            custom_all_reduce=not self.disable_custom_all_reduce,
            fused_all_reduce_norm=self.fused_all_reduce_norm and not self.batch_invariant,
            fused_all_reduce_max_world_size=self.fused_all_reduce_max_world_size,
            batch_invariant=self.batch_invariant,
            cpu_compile=cpu_compile,
            cpu_native_decode=self.cpu_native_decode and attention_backend == "cpu",
            gguf_weight_type=_gguf_weight_type(self.quantization, source, device, self.tensor_parallel_size),
            gguf_int8_activations=self.gguf_int8_activations,
            gguf_embedding_type=_gguf_embedding_type(self.quantization, self.gguf_int8_activations, source),
        )
        layout = model_cfg.attention_layout
        max_num_seqs = self.max_num_seqs or DEFAULT_MAX_NUM_SEQS
        step = max(self.block_size, STATE_CHECKPOINT_ALIGNMENT)
        if layout.is_hybrid and (self.state_checkpoint_interval < step or self.state_checkpoint_interval % step):
            raise ValueError(f"state_checkpoint_interval ({self.state_checkpoint_interval}) must be a "
                             f"multiple of block_size ({self.block_size}) and of {STATE_CHECKPOINT_ALIGNMENT}")
        return EngineConfig(
            model=model_cfg,
            cache=CacheConfig(self.block_size, self.kv_cache_memory, self.gpu_memory_utilization,
                              self.enable_prefix_caching, self.num_gpu_blocks_override, kv_cache_dtype,
                              sliding_window=layout.kv_free_window,
                              num_state_slots=_num_state_slots(layout.is_hybrid, max_num_seqs,
                                                               self.enable_prefix_caching),
                              state_checkpoint_interval=self.state_checkpoint_interval if layout.is_hybrid else 0),
            scheduler=SchedulerConfig(max_num_seqs, max_batched, self.scheduling_policy, max_model_len,
                                      device.type == "cuda" if self.async_scheduling is None
                                      else self.async_scheduling),
            parallel=ParallelConfig(self.tensor_parallel_size, self.worker_extension_cls),
            device=device,
            load_format=source.load_format,
            kernels=kernels,
            # max_model_len as resolved here: the engine core and tensor-parallel ranks rebuild the
            # config from these and must not resolve the CPU default again (another process, another
            # cgroup limit).
            engine_args=dataclasses.replace(self, max_model_len=max_model_len),
        )

    def _create_embedding_config(self, device: torch.device) -> EngineConfig:
        """An embedding model: whole prompts (bidirectional attention cannot be chunked), pooled
        once; no KV cache, no decoding, no CUDA graphs, nothing to share between prompts."""
        if self.tensor_parallel_size != 1:
            raise ValueError("embedding models run on one rank: tensor_parallel_size must be 1")
        if self.kv_cache_dtype != "auto":
            raise ValueError("an embedding model has no KV cache: kv_cache_dtype does not apply")
        if self.quantization is not None:
            raise ValueError("quantization is not supported for embedding models")
        if self.batch_invariant:
            raise ValueError("batch_invariant is not implemented for embedding models (no batch-invariant "
                             "encoder layers)")
        source = resolve_embedding_source(self.model, self.load_format)
        hf_config = source.load_hf_config()
        architecture = (getattr(hf_config, "architectures", None) or ["?"])[0]
        if getattr(hf_config, "quantization_config", None) is not None:
            raise ValueError("quantised embedding models (quantization_config) are not supported")
        if architecture not in ENCODER_ARCHITECTURES:
            raise ValueError(f"architecture {architecture!r} is not an embedding model this engine runs "
                             f"(encoders: {', '.join(ENCODER_ARCHITECTURES)})")
        if self.dtype == "auto":
            # The CPU has no fast float16 GEMM: float16 checkpoints (and untyped ones) run in float32.
            checkpoint = str(getattr(hf_config, "dtype", None) or "")
            dtype = torch.bfloat16 if checkpoint.endswith("bfloat16") else torch.float32
        else:
            dtype = resolve_dtype(self.dtype, hf_config, device)
        trained = trained_max_len(source.pooling_root)
        model_max = min(getattr(hf_config, "max_position_embeddings", 512), trained or 1 << 30)
        max_model_len = self.max_model_len or model_max
        if not 1 <= max_model_len <= model_max:
            raise ValueError(f"max_model_len must be in [1, {model_max}] for this model, got {max_model_len}")
        # Real tokens per forward pass: 4096 measured best on a 2-core x86 CPU (large GEMMs whose
        # activations still fit in cache); one longest input always fits.
        max_batched = max(self.max_num_batched_tokens or (32768 if device.type == "cuda" else 4096), max_model_len)
        pooling = PoolingConfig.from_model_dir(source.pooling_root, hf_config.to_dict())
        model_cfg = ModelConfig(
            model=self.model or source.display_name, source=source, hf_config=hf_config,
            architecture=architecture, dtype=dtype, max_model_len=max_model_len,
            served_model_name=self.served_model_name or source.display_name, seed=self.seed, task="embed",
            pooling=pooling)
        return EngineConfig(
            model=model_cfg,
            cache=CacheConfig(self.block_size, None, self.gpu_memory_utilization, False),
            scheduler=SchedulerConfig(self.max_num_seqs or max_batched, max_batched, self.scheduling_policy,
                                      max_model_len, async_scheduling=False, chunked_prefill=False),
            parallel=ParallelConfig(1),
            device=device,
            load_format=source.load_format,
            kernels=KernelConfig(attention_backend="encoder", enforce_eager=True),
            engine_args=dataclasses.replace(self),
        )


def _resolve_cpu_compile(requested: bool, device: torch.device, tensor_parallel_size: int,
                         enforce_eager: bool, attention_backend: str | None) -> bool:
    """Whether the CPU forward is compiled; a request that cannot be honoured is refused."""
    possible = device.type == "cpu" and tensor_parallel_size == 1 and attention_backend in (None, "cpu")
    if requested and not possible:
        raise ValueError(f"cpu_compile needs device cpu, tensor_parallel_size 1 and the cpu attention backend "
                         f"(got device {device.type}, tensor_parallel_size {tensor_parallel_size}, "
                         f"attention_backend {attention_backend})")
    if requested and enforce_eager:
        raise ValueError("cpu_compile and enforce_eager contradict each other")
    return requested


def _gguf_embedding_type(quantization: str | None, int8_activations: bool, source) -> str | None:
    """The embedding table's block type where it can stay quantised (with the int8-activation
    kernel; whether that runs on this machine is checked when the model is built)."""
    if quantization not in QUANTIZATIONS or not int8_activations:
        return None
    from tokenmill.config.gguf_metadata import gguf_embedding_type
    return gguf_embedding_type(source.path)


def _gguf_weight_type(quantization: str | None, source, device: torch.device, tensor_parallel_size: int
                      ) -> str | None:
    if quantization not in QUANTIZATIONS:
        return None
    if source.load_format != "gguf":
        raise ValueError(f"quantization='gguf' needs a GGUF model; {source.display_name} loads as {source.load_format}")
    if device.type != "cpu" or tensor_parallel_size != 1:
        raise ValueError(f"quantization='gguf' runs on one CPU rank (got device {device.type}, "
                         f"tensor_parallel_size {tensor_parallel_size})")
    from tokenmill.config.gguf_metadata import gguf_linear_weight_type
    return gguf_linear_weight_type(source.path)


def _num_state_slots(hybrid: bool, max_num_seqs: int, prefix_caching: bool) -> int:
    """A hybrid model's state slots: one per request that can run, and as many again for
    prefix-cache checkpoints when caching is on (checkpoints only ever take free slots)."""
    if not hybrid:
        return 0
    return max_num_seqs * (2 if prefix_caching else 1)


def _check_tensor_parallel_split(hf_config: Any, tp: int) -> None:
    """Refuse a split the layers cannot make, before any worker process starts."""
    heads = hf_config.num_attention_heads
    if getattr(hf_config, "kv_lora_rank", None):
        # Latent attention (DeepSeek): query heads split evenly, the latent is replicated.
        divide(heads, tp, "attention heads")
    else:
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
