"""The CUDA MLA backend: Triton kernels for the rotary embedding fused with the latent cache write
(`ops/mla_cache_write.py`) and the paged latent decode (`ops/mla_decode.py`); prefill expands the
latent and runs the dense paged prefill kernel (`ops/attention_prefill.py`).

Prefill: this step's keys and values come from its own latents, expanded through `kv_b_proj`;
a request with a cached prefix (a later chunk, a prefix-cache hit) has the prefix's blocks read
back from the latent cache and expanded into a temporary per-head cache for the step, which the
prefill kernel reads through a block table of its own. The dense kernel takes one head size for
q, k and v (192 for DeepSeek), so values are zero-padded to it and the output sliced back.

A decode-only step (what CUDA graphs capture) reads no device value on the host: the rotary and
cache-write kernel, the absorbed projections (`mla.py`, batched matmuls) and the decode kernels,
whose split count follows `meta.max_seq_len` (`max_model_len` under capture).
"""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.mla_backend import ExpandLatent, MLABackend, gather_latent_rows, host_tensor
from tokenmill.model.layers.rotary_embedding import RotaryInputs
from tokenmill.ops.attention_common import LaunchConfig
from tokenmill.ops.attention_prefill import paged_prefill
from tokenmill.ops.mla_cache_write import rope_and_write_latent
from tokenmill.ops.mla_decode import mla_decode
from tokenmill.utils.transfer import to_device

# DeepSeek's 192-wide heads pad to 256 in the prefill kernel: half the dense kernel's 128 x 128
# tiles keeps q and two stages of K/V tiles within shared memory.
MLA_PREFILL_CONFIG = LaunchConfig(block_m=64, block_n=64, num_warps=4, num_stages=2)
MLA_PREFILL_CONFIG_FP32 = LaunchConfig(block_m=32, block_n=32, num_warps=4, num_stages=1)


class TritonMLABackend(MLABackend):
    def rope_and_write(self, q, k_pe, latent, cache, slot_mapping, rope: RotaryInputs, kv_scale):
        rope_and_write_latent(q[..., self.dims.qk_nope_head_dim:], k_pe, latent, cache, slot_mapping,
                              rope.positions, rope.cos_sin_cache, kv_scale, self.interleaved_rope)
        return q, k_pe

    def decode(self, q_latent, q_pe, cache, meta: AttentionMetadata, out, kv_scale) -> None:
        mla_decode(q_latent, q_pe, cache, meta.block_table, meta.seq_lens, out, meta.max_seq_len,
                   self.scale, kv_scale)

    def prefill(self, q, latent, k_pe, cache, meta: AttentionMetadata, expand: ExpandLatent, kv_scale, out) -> None:
        dims = self.dims
        nope, width = dims.qk_nope_head_dim, dims.qk_head_dim
        starts = host_tensor(meta.query_start_loc_cpu, meta.query_start_loc).numpy()
        seq_lens = host_tensor(meta.seq_lens_cpu, meta.seq_lens).numpy()
        first = int(starts[meta.num_decodes])  # the prefill tokens' rows: first:
        num_tokens = q.shape[0]
        keys = q.new_empty(num_tokens, dims.num_heads, width)  # rows before `first` are never read
        values = q.new_zeros(num_tokens, dims.num_heads, width)  # zero past v_head_dim
        kv = expand(latent[first:])
        keys[first:, :, :nope] = kv[..., :nope]
        keys[first:, :, nope:] = k_pe[first:, None, :]
        values[first:, :, : dims.v_head_dim] = kv[..., nope:]
        k_cache, v_cache, block_table = self._expanded_prefix(cache, meta, starts, seq_lens, expand, kv_scale,
                                                              q.dtype)
        attn = torch.empty_like(keys)
        paged_prefill(
            q, keys, values, k_cache, v_cache, block_table, meta.query_start_loc, meta.seq_lens, attn,
            first_req=meta.num_decodes, num_reqs=meta.num_prefills, max_query_len=meta.max_query_len,
            scale=self.scale, causal=True,
            config=MLA_PREFILL_CONFIG_FP32 if q.element_size() > 2 else MLA_PREFILL_CONFIG,
        )
        out[first:] = attn[first:, :, : dims.v_head_dim]

    def _expanded_prefix(self, cache, meta: AttentionMetadata, starts: np.ndarray, seq_lens: np.ndarray,
                         expand: ExpandLatent, kv_scale: float, dtype: torch.dtype):
        """(k_cache, v_cache, block_table) in the prefill kernel's layout for the cached prefixes of
        the step's prefill requests: their whole blocks, expanded per head; the table's row i lists
        request i's blocks there. Without prefixes, a one-block stand-in the kernel never reads."""
        dims = self.dims
        block_size = cache.shape[1]
        first_req = meta.num_decodes
        context_lens = (seq_lens[first_req:meta.num_reqs] - np.diff(starts[first_req:meta.num_reqs + 1]))
        blocks = (context_lens + block_size - 1) // block_size
        shape = (dims.num_heads, dims.qk_head_dim)
        if not blocks.any():
            stand_in = cache.new_empty((1, block_size, *shape), dtype=dtype)
            return stand_in, stand_in, meta.block_table
        rows = [meta.block_table[first_req + j, :n] for j, n in enumerate(blocks.tolist()) if n]
        prefix = gather_latent_rows(cache, torch.cat(rows), kv_scale, dtype)  # [num_blocks * block_size, width]
        kv = expand(prefix[:, : dims.kv_lora_rank])
        nope = dims.qk_nope_head_dim
        k_cache = prefix.new_empty((len(prefix), *shape))
        k_cache[:, :, :nope] = kv[..., :nope]
        k_cache[:, :, nope:] = prefix[:, None, dims.kv_lora_rank:]
        v_cache = prefix.new_zeros((len(prefix), *shape))
        v_cache[:, :, : dims.v_head_dim] = kv[..., nope:]
        table = np.zeros((meta.num_reqs, max(1, int(blocks.max()))), np.int32)
        offsets = np.concatenate([[0], np.cumsum(blocks)[:-1]])
        for j, (offset, n) in enumerate(zip(offsets.tolist(), blocks.tolist())):
            table[first_req + j, :n] = np.arange(offset, offset + n)
        block_table = to_device(table, torch.int32, cache.device)
        return (k_cache.view(-1, block_size, *shape), v_cache.view(-1, block_size, *shape), block_table)
