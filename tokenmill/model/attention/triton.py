"""The CUDA attention backend: Triton kernels for the KV-cache write (`ops/kv_cache_write.py`),
paged prefill (`ops/attention_prefill.py`) and split-KV paged decode (`ops/attention_decode.py`).

Its builder decides cascade attention: a decode batch whose requests share a long prefix in the
same KV blocks (`common_prefix.py`) gets `meta.common_prefix_len`, and the decodes then run as
cascade attention (`ops/attention_cascade.py`): the shared prefix is attended once for the batch.

A decode-only step (what CUDA graphs capture) reads no device value on the host and allocates
only buffers whose sizes follow from Python ints, so it can be captured and replayed. Captures use
`meta.max_seq_len` = the longest context a replay can have (`max_model_len`): it sizes the split
count; the kernels themselves read the real `seq_lens`.

Each backend instance (one per layer) keeps a persistent buffer of split counters for the decode
kernel (the kernel leaves it zeroed), so calls on one instance run on one CUDA stream, in order,
which is what a model's layers do.

An fp8 cache (`kv_cache_dtype="fp8"`) is recognised by its dtype; the kernels then quantize on
write and dequantize on read with the layer's `k_scale` / `v_scale`. The rotation of q and k is
fused into the cache write (`rope_and_write_kv_cache`): a launch per layer saved. So is a layer's
per-head q/k RMSNorm (Qwen3, `fuse_qk_norm`): two launches fewer a layer.
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.model.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionMetadataBuilder,
    KVCache,
    StepBatch,
)
from tokenmill.model.attention.common_prefix import CASCADE_MIN_DECODES, common_prefix_tokens
from tokenmill.model.layers.layernorm import RMSNorm
from tokenmill.model.layers.rotary_embedding import RotaryInputs
from tokenmill.ops.attention_cascade import cascade_decode
from tokenmill.ops.attention_decode import new_split_counters, paged_decode
from tokenmill.ops.attention_prefill import paged_prefill
from tokenmill.model.build_context import build_context
from tokenmill.ops.kv_cache_write import rope_and_write_kv_cache, write_kv_cache


class TritonMetadataBuilder(AttentionMetadataBuilder):
    supports_decode_graphs = True

    def __init__(self, config, device) -> None:
        super().__init__(config, device)
        self.cascade = config.kernels.cascade_attention
        self.block_size = config.cache.block_size
        # The shared prefix's length, on the device where a captured graph reads it.
        self._prefix_len = torch.zeros(1, dtype=torch.int32, device=device)
        self._prefix_len_host = [torch.zeros(1, dtype=torch.int32, pin_memory=device.type == "cuda")
                                 for _ in range(2)]
        self._turn = 0  # host twin for this step: under async scheduling the last one may still be copying

    def common_prefix_len(self, block_table: np.ndarray, seq_lens: np.ndarray) -> int:
        if not self.cascade or len(seq_lens) < CASCADE_MIN_DECODES:
            return 0
        return common_prefix_tokens(block_table, seq_lens, self.block_size)

    def build(self, batch: StepBatch, common_prefix_len: int = 0) -> AttentionMetadata:
        meta = batch.meta
        if common_prefix_len:
            host = self._prefix_len_host[self._turn]
            self._turn ^= 1
            host[0] = common_prefix_len
            self._prefix_len.copy_(host, non_blocking=True)
            meta.common_prefix_len = self._prefix_len
        return meta

    def build_for_capture(self, batch: StepBatch, cascade: bool, max_model_len: int) -> AttentionMetadata:
        meta = batch.meta
        meta.max_seq_len = max_model_len  # sizes the split count; the kernels read the real lengths
        meta.common_prefix_len = self._prefix_len if cascade else None
        return meta

    @property
    def cascade_min_decodes(self) -> int | None:
        """Decode batches from this size may run as cascade attention (graphs capture a variant)."""
        return CASCADE_MIN_DECODES if self.cascade else None


class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        self._split_counters: torch.Tensor | None = None  # [>= num_decodes * num_kv_heads] int32
        self._pdl = build_context().pdl  # the decode chain's kernels launch dependent (ops/pdl.py)
        self._qk_norm: tuple[RMSNorm, RMSNorm] | None = None  # applied here (`fuse_qk_norm`)

    @staticmethod
    def builder_class() -> type[AttentionMetadataBuilder]:
        return TritonMetadataBuilder

    def fuse_qk_norm(self, q_norm: RMSNorm, k_norm: RMSNorm) -> bool:
        # The rope + write kernel reproduces the norm layer's Triton kernel (`ops/rms_norm.py`), not
        # its PyTorch form: it takes the norms only where they would run that kernel.
        if not (q_norm.uses_cuda_kernels and k_norm.uses_cuda_kernels and q_norm.eps == k_norm.eps):
            return False
        self._qk_norm = (q_norm, k_norm)
        return True

    def _counters(self, num_entries: int, device: torch.device) -> torch.Tensor:
        # Sized generously on first use so that the warm-up before graph capture allocates it
        # and captured graphs never need a bigger one.
        counters = self._split_counters
        if counters is None or counters.numel() < num_entries or counters.device != device:
            counters = new_split_counters(max(num_entries, 8192), device)
            self._split_counters = counters
        return counters

    def forward(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata, k_scale: float = 1.0,
                v_scale: float = 1.0, rope: RotaryInputs | None = None) -> torch.Tensor:
        k_cache, v_cache = kv_cache
        # Write first: decodes read their own new key back from the cache. q and k are normalised
        # and rotated in place, so the prefill below reads this step's keys as they were cached.
        if rope is not None:
            norms = {}
            if self._qk_norm is not None:
                q_norm, k_norm = self._qk_norm
                norms = dict(q_norm_weight=q_norm.weight, k_norm_weight=k_norm.weight, qk_norm_eps=q_norm.eps)
            rope_and_write_kv_cache(q, k, v, k_cache, v_cache, meta.slot_mapping, rope.positions,
                                    rope.cos_sin_cache, k_scale, v_scale, pdl=self._pdl, **norms)
        else:
            if self._qk_norm is not None:
                q, k = self._qk_norm[0](q), self._qk_norm[1](k)
            write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_decodes = meta.num_decodes
        if num_decodes and meta.common_prefix_len is not None:
            assert self.sliding_window is None, "cascade attention is off for models with a sliding window"
            cascade_decode(
                q[:num_decodes], k_cache, v_cache, meta.block_table, meta.seq_lens, meta.common_prefix_len,
                out[:num_decodes], self.scale, k_scale=k_scale, v_scale=v_scale,
            )
        elif num_decodes:
            paged_decode(
                q[:num_decodes], k_cache, v_cache, meta.block_table, meta.seq_lens,
                out[:num_decodes], meta.max_seq_len, self.scale,
                split_counters=self._counters(num_decodes * k_cache.shape[2], q.device),
                k_scale=k_scale, v_scale=v_scale, sliding_window=self.sliding_window, pdl=self._pdl,
            )
        if meta.num_prefills:
            paged_prefill(
                q, k, v, k_cache, v_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, out,
                first_req=num_decodes, num_reqs=meta.num_prefills,
                max_query_len=meta.max_query_len, scale=self.scale, causal=meta.causal,
                k_scale=k_scale, v_scale=v_scale, sliding_window=self.sliding_window,
            )
        return out
