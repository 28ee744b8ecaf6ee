"""The CPU attention backend: the whole of a layer's attention (KV-cache write, decode, prefill) as
one opaque op, `torch.ops.tokenmill.cpu_paged_attention`, so that a compiled CPU forward pass
(`--cpu-compile`, `worker/cpu_compile.py`) keeps every other op of the model in one inductor graph
and calls this op once per layer.

Inside the op the step's integers (how many decodes, each request's lengths) are read from the
host tensors, which on the CPU are the tensors themselves: nothing about them reaches the
compiler, so it never specialises on a batch's lengths. Decodes are attended together, by the C++
kernel that reads the paged cache in place (`ops/cpu_paged_decode.py`; 3.5-6x faster than the
gather below, docs/perf-cpu.md) where it is built and the cache holds the model's dtype; a step of
decodes and fresh prompts (nothing cached before them) is then the C++ op
`cpu_paged_attention_native` from end to end, the prompts through causal SDPA. Otherwise each
request's blocks are gathered once in the cache's dtype and handed, as strided views, to
`scaled_dot_product_attention` with a padding mask. Prefills run as in `torch_native`, which stays
the reference this backend is tested against.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from tokenmill.model.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionMetadataBuilder,
    StepBatch,
)
from tokenmill.model.attention.torch_native import TorchNativeBackend, write_kv_cache
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.rotary_embedding import rotate_neox
from tokenmill.ops import cpu_paged_decode
from tokenmill.ops.kv_quant import read_kv


def _num_decodes(query_start_loc: np.ndarray) -> int:
    """Requests with a one-token query; the runner puts them first."""
    query_lens = np.diff(query_start_loc)
    not_one = np.flatnonzero(query_lens != 1)
    return int(not_one[0]) if len(not_one) else len(query_lens)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, k_scale: float, v_scale: float,
                 native: bool = False) -> torch.Tensor:
    """One-token queries `q` [B, heads, head_dim] against their paged context (`seq_lens` [B] tokens
    through `block_table` rows [B, >= blocks]); returns [B, heads, head_dim]. `native`: the C++
    kernel where the cache holds q's dtype (an fp8 cache takes the gather path)."""
    if native and k_cache.dtype == q.dtype:
        return cpu_paged_decode.paged_decode(q, k_cache, v_cache, block_table, seq_lens, scale)
    num_decodes, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    lens = seq_lens.numpy()
    max_len = int(lens.max())
    num_blocks = -(-max_len // block_size)
    block_ids = block_table[:num_decodes, :num_blocks].reshape(-1)
    # [B, kv_heads, num_blocks * block_size, head_dim] as a strided view of one gathered copy
    keys = k_cache.index_select(0, block_ids).view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, block_ids).view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
    keys, values = read_kv(keys, k_scale, q.dtype), read_kv(values, v_scale, q.dtype)
    if int(lens.min()) == max_len:  # equal lengths (one stream, say): the context is a slice, no mask
        keys, values, valid = keys[:, :, :max_len], values[:, :, :max_len], None
    else:
        positions = torch.arange(keys.shape[2])
        valid = (positions[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    # The query heads sharing a KV head go in as that head's rows ([B, kv_heads, group, head_dim]),
    # not as heads of one row each: the same numbers, and SDPA's CPU kernel has a third of the
    # (request, head) blocks to walk (1.65x faster at batch 32, SmolLM2's 9 / 3 heads).
    group = num_heads // num_kv_heads
    out = F.scaled_dot_product_attention(q.view(num_decodes, num_kv_heads, group, head_dim), keys, values,
                                         attn_mask=valid, scale=scale)
    return out.view(num_decodes, num_heads, head_dim)


def _write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor, k_scale: float, v_scale: float) -> None:
    """`write_kv_cache`, with its checks made on the host copy (the tensors themselves on the CPU)."""
    slots = slot_mapping[:k.shape[0]]
    if k_cache.dtype != k.dtype or bool((slots.numpy() < 0).any()):  # fp8, or padding slots
        write_kv_cache(k, v, (k_cache, v_cache), slot_mapping, k_scale, v_scale)
        return
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slots, v)


# Registered with `torch.library.Library` rather than `torch.library.custom_op`: the op runs once per
# layer per step, and custom_op's Python wrapper cost ~90 us a call here (30 layers: ~3 ms of a
# ~24 ms SmolLM2 decode step); a plain dispatcher kernel costs a few.
_LIBRARY = torch.library.Library("tokenmill", "FRAGMENT")
_LIBRARY.define(
    "cpu_paged_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
    "Tensor slot_mapping, Tensor block_table, Tensor seq_lens, Tensor query_start_loc, float scale, "
    "float k_scale, float v_scale, bool causal, bool native_decode) -> Tensor")


def cpu_paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, slot_mapping: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
                        k_scale: float, v_scale: float, causal: bool, native_decode: bool) -> torch.Tensor:
    """Write the step's k / v [T, kv_heads, head_dim] into the paged cache, then attend q
    [T, heads, head_dim] (metadata as in `AttentionMetadata`); returns [T, heads, head_dim].
    `native_decode`: the decodes through the C++ kernel (`paged_decode`)."""
    _write_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    starts = query_start_loc.numpy()
    num_reqs = len(starts) - 1
    num_decodes = _num_decodes(starts)
    if num_decodes == num_reqs == q.shape[0]:  # a decode-only step: the output is the decode's
        return paged_decode(q, k_cache, v_cache, block_table, seq_lens[:num_decodes], scale, k_scale, v_scale,
                            native_decode)
    out = torch.empty_like(q)
    if num_decodes:
        out[:num_decodes] = paged_decode(q[:num_decodes], k_cache, v_cache, block_table, seq_lens[:num_decodes],
                                         scale, k_scale, v_scale, native_decode)
    meta = AttentionMetadata(
        num_reqs=num_reqs, num_tokens=q.shape[0], num_decodes=num_decodes,
        max_query_len=int(np.diff(starts).max()), max_seq_len=int(seq_lens.max()),
        query_start_loc=query_start_loc, seq_lens=seq_lens, block_table=block_table,
        slot_mapping=slot_mapping, causal=causal, query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens)
    reference = TorchNativeBackend(q.shape[1], k_cache.shape[2], k_cache.shape[3], scale)
    reference._prefill(q, k, v, (k_cache, v_cache), meta, (k_scale, v_scale), out)
    return out


_LIBRARY.impl("cpu_paged_attention", cpu_paged_attention, "CPU")


@torch.library.register_fake("tokenmill::cpu_paged_attention", lib=_LIBRARY)
def _(q, k, v, k_cache, v_cache, slot_mapping, block_table, seq_lens, query_start_loc, scale, k_scale,
      v_scale, causal, native_decode):
    return torch.empty_like(q)


class CpuMetadataBuilder(AttentionMetadataBuilder):
    def build(self, batch: StepBatch, common_prefix_len: int = 0) -> AttentionMetadata:
        return batch.meta


class CpuBackend(AttentionBackend):
    name = "cpu"
    supports_sliding_window = False  # (its decode reads whole contexts: torch_native has the window)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, native_decode: bool | None = None) -> None:
        """`native_decode`: ask for the C++ decode kernel (None: as the engine's KernelConfig says).
        Chosen once: the first layer built builds the kernel, or learns it cannot be built here."""
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        if native_decode is None:
            native_decode = build_context().kernels.cpu_native_decode
        self.native_decode = native_decode and cpu_paged_decode.supports(head_dim)

    @staticmethod
    def builder_class() -> type[AttentionMetadataBuilder]:
        return CpuMetadataBuilder

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, k_scale: float = 1.0, v_scale: float = 1.0,
                rope=None) -> torch.Tensor:
        if rope is not None:
            q, k = rotate_neox(q, k, rope)
        k_cache, v_cache = kv_cache
        if self.native_decode:  # in C++ for decodes and fresh prompts (ops/cpu_paged_decode.cpp)
            return torch.ops.tokenmill.cpu_paged_attention_native(
                q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_table, meta.seq_lens, meta.query_start_loc,
                self.scale, k_scale, v_scale, meta.causal)
        return torch.ops.tokenmill.cpu_paged_attention(
            q, k, v, k_cache, v_cache, meta.slot_mapping, meta.block_table, meta.seq_lens, meta.query_start_loc,
            self.scale, k_scale, v_scale, meta.causal, False)
