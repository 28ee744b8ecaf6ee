"""The CUDA attention backend: Triton kernels for the KV-cache write, paged prefill and split-KV
paged decode (see `triton_kernels.py`).

Given `meta.common_prefix_len`, the decodes run as cascade attention (`triton_cascade.py`): the
prefix all of them share is attended once for the whole batch.

A decode-only step (what CUDA graphs capture) reads no device value on the host and allocates
only buffers whose sizes follow from Python ints, so it can be captured and replayed. Capture
with `meta.max_seq_len` set to the longest context the graph will replay with (e.g.
`max_model_len`): it sizes the split count; the kernels themselves read the real `seq_lens`.

The backend keeps one persistent buffer of split counters for the decode kernel (the kernel
leaves it zeroed). Calls on one backend instance must therefore run on one CUDA stream, in order,
which is what a model's layers do.

An fp8 cache (`kv_cache_dtype="fp8"`) is recognised by its dtype; the kernels then quantize on
write and dequantize on read with the layer's `k_scale` / `v_scale`.

Given `rope` in its CUDA form (positions, cos|sin table), the rotation of q and k is fused into
the cache write (`rope_and_write_kv_cache`).
"""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    KVCache,
    register_backend,
)
from tokenmill.model.attention.triton_cascade import cascade_decode
from tokenmill.model.attention.triton_kernels import (
    new_split_counters,
    paged_decode,
    paged_prefill,
    rope_and_write_kv_cache,
    write_kv_cache,
)
from tokenmill.model.layers.basic import apply_rotary


@register_backend
class TritonBackend(AttentionBackend):
    name = "triton"

    def __init__(self) -> None:
        self._split_counters: torch.Tensor | None = None  # [>= num_decodes * num_kv_heads] int32

    def _counters(self, num_entries: int, device: torch.device) -> torch.Tensor:
        # Sized generously on first use so that the warm-up before graph capture allocates it
        # and captured graphs never need a bigger one.
        counters = self._split_counters
        if counters is None or counters.numel() < num_entries or counters.device != device:
            counters = new_split_counters(max(num_entries, 8192), device)
            self._split_counters = counters
        return counters

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        k_cache, v_cache = kv_cache
        # Write first: decodes read their own new key back from the cache.
        if rope is not None and _is_positions_form(rope):
            # One launch rotates q and k in place and writes the rotated keys: a launch per layer
            # fewer than rope_neox_ + write_kv_cache.
            positions, cos_sin_cache = rope
            rope_and_write_kv_cache(q, k, v, k_cache, v_cache, meta.slot_mapping, positions, cos_sin_cache,
                                    k_scale, v_scale)
        else:
            if rope is not None:  # (cos, sin): the CPU form (tensors off the GPU, e.g. the interpreter)
                q, k = apply_rotary(q, k, *rope)
            write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_decodes = meta.num_decodes
        if num_decodes and meta.common_prefix_len is not None:
            cascade_decode(
                q[:num_decodes], k_cache, v_cache, meta.block_table, meta.seq_lens, meta.common_prefix_len,
                out[:num_decodes], scale, k_scale=k_scale, v_scale=v_scale,
            )
        elif num_decodes:
            paged_decode(
                q[:num_decodes], k_cache, v_cache, meta.block_table, meta.seq_lens,
                out[:num_decodes], meta.max_seq_len, scale,
                split_counters=self._counters(num_decodes * k_cache.shape[2], q.device),
                k_scale=k_scale, v_scale=v_scale,
            )
        if meta.num_prefills:
            paged_prefill(
                q, k, v, k_cache, v_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, out,
                first_req=num_decodes, num_reqs=meta.num_prefills,
                max_query_len=meta.max_query_len, scale=scale, causal=meta.causal,
                k_scale=k_scale, v_scale=v_scale,
            )
        return out


def _is_positions_form(rope: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether `rope` is `RotaryEmbedding.cos_sin`'s CUDA form, (positions, cos_sin_cache), the one
    the fused kernel reads; the CPU form is (cos, sin), both floating point."""
    return not rope[0].is_floating_point()
