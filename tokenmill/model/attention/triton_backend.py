"""The CUDA attention backend: Triton kernels for the KV-cache write, paged prefill and split-KV
paged decode (see `triton_kernels.py`).

A decode-only step (what CUDA graphs capture) reads no device value on the host and allocates
only buffers whose sizes follow from Python ints, so it can be captured and replayed. Capture
with `meta.max_seq_len` set to the longest context the graph will replay with (e.g.
`max_model_len`): it sizes the split count; the kernels themselves read the real `seq_lens`.
"""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    KVCache,
    register_backend,
)
from tokenmill.model.attention.triton_kernels import paged_decode, paged_prefill, write_kv_cache


@register_backend
class TritonBackend(AttentionBackend):
    name = "triton"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        k_cache, v_cache = kv_cache
        # Write first: the prefill kernel reads this step's own keys back from the cache, which
        # is what lets a chunk attend over its cached prefix with no special case.
        write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        num_decodes = meta.num_decodes
        if num_decodes:
            paged_decode(
                q[:num_decodes], k_cache, v_cache, meta.block_table, meta.seq_lens,
                out[:num_decodes], meta.max_seq_len, scale,
            )
        if meta.num_prefills:
            paged_prefill(
                q, k_cache, v_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, out,
                first_req=num_decodes, num_reqs=meta.num_prefills,
                max_query_len=meta.max_query_len, scale=scale, causal=meta.causal,
            )
        return out
