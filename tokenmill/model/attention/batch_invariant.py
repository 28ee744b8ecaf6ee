"""The batch-invariant attention backend (`--batch-invariant`, docs/rl.md): a query's result is a
function of its own keys only, whatever else is in the step, however its prompt was chunked, and
whether it is decoded or recomputed after a preemption.

The step's K/V are written to the cache first; then every query row walks its keys [0, position]
from the cache in tiles of `KEY_TILE` aligned at position 0, folding each into an online softmax
in float32, in that order. Tiles past a row's last key change nothing (weight exp(-inf) = 0,
rescale exp(0) = 1), so rows of different lengths share the loop, and every reduction has a fixed
size (a tile, a head) independent of the batch. On CUDA the same walk is one Triton kernel
(`ops/attention_batch_invariant.py`); on the CPU it is written out in PyTorch below, with
products and sums rather than matmuls (BLAS picks kernels by shape).
"""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionMetadataBuilder,
    KVCache,
    StepBatch,
)
from tokenmill.model.attention.torch_native import gather_blocks, write_kv_cache
from tokenmill.model.layers.rotary_embedding import RotaryInputs, rotate_neox
from tokenmill.ops.kv_quant import read_kv

KEY_TILE = 32  # keys per tile on the CPU (a multiple of the vector width: no scalar tail)
ROW_GROUP = 256  # query rows per pass over the tiles (bounds the [rows, heads, tile, head_dim] products)


def attend_fixed_tiles(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_end: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """q [R, kv_heads, group, D] float32; keys / values [R or 1, L, kv_heads, D] float32, L a
    multiple of KEY_TILE, zero past each row's keys; row r attends keys [0, key_end[r]) (>= 1).
    Returns [R, kv_heads, group, D] float32."""
    rows, kv_heads, group, _ = q.shape
    m = q.new_full((rows, kv_heads, group), float("-inf"))
    l = q.new_zeros((rows, kv_heads, group))
    acc = torch.zeros_like(q)
    offsets = torch.arange(KEY_TILE, device=q.device)
    q5 = q.unsqueeze(3)  # [R, kv, g, 1, D]
    for start in range(0, keys.shape[1], KEY_TILE):
        # Contiguous tiles, so the products below are laid out alike for one row or many.
        k = keys[:, start:start + KEY_TILE].permute(0, 2, 1, 3).contiguous().unsqueeze(2)  # [R|1, kv, 1, T, D]
        scores = (q5 * k).sum(-1) * scale  # [R, kv, g, T]
        masked = (start + offsets)[None, :] >= key_end[:, None]  # [R, T]
        scores.masked_fill_(masked[:, None, None, :], float("-inf"))
        m_new = torch.maximum(m, scores.amax(-1))
        p = torch.exp(scores - m_new.unsqueeze(-1))
        alpha = torch.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        v = values[:, start:start + KEY_TILE].permute(0, 2, 1, 3).contiguous().unsqueeze(2)  # [R|1, kv, 1, T, D]
        acc = acc * alpha.unsqueeze(-1) + (p.unsqueeze(-1) * v).sum(-2)
        m = m_new
    return acc / l.unsqueeze(-1)


def _padded(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """`x` zero-padded (or cut) to `length` along `dim`."""
    if x.shape[dim] >= length:
        return x.narrow(dim, 0, length)
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


class BatchInvariantMetadataBuilder(AttentionMetadataBuilder):
    supports_decode_graphs = True  # (CUDA: the kernel reads lengths on the device)

    def build(self, batch: StepBatch, common_prefix_len: int = 0) -> AttentionMetadata:
        return batch.meta

    def build_for_capture(self, batch: StepBatch, cascade: bool, max_model_len: int) -> AttentionMetadata:
        return batch.meta


class BatchInvariantBackend(AttentionBackend):
    name = "batch_invariant"
    supports_sliding_window = False  # (config/batch_invariant.py refuses windowed models first)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        from tokenmill.model.build_context import build_context
        self._on_cuda = build_context().on_cuda
        if self._on_cuda:
            from tokenmill.ops import attention_batch_invariant, kv_cache_write
            self._attention = attention_batch_invariant.batch_invariant_attention
            self._rope_and_write = kv_cache_write.rope_and_write_kv_cache
            self._write = kv_cache_write.write_kv_cache

    @staticmethod
    def builder_class() -> type[AttentionMetadataBuilder]:
        return BatchInvariantMetadataBuilder

    def forward(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata, k_scale: float = 1.0,
                v_scale: float = 1.0, rope: RotaryInputs | None = None) -> torch.Tensor:
        assert meta.causal, "the batch-invariant backend serves decoders"
        if self._on_cuda:
            return self._forward_cuda(q, k, v, kv_cache, meta, k_scale, v_scale, rope)
        if rope is not None:
            q, k = rotate_neox(q, k, rope)
        write_kv_cache(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty_like(q)
        starts = _host(meta.query_start_loc_cpu, meta.query_start_loc).tolist()
        seq_lens = _host(meta.seq_lens_cpu, meta.seq_lens).tolist()
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decodes(q[: meta.num_decodes], kv_cache, meta, seq_lens, k_scale, v_scale)
        for i in range(meta.num_decodes, meta.num_reqs):
            start, end = starts[i], starts[i + 1]
            out[start:end] = self._request(q[start:end], kv_cache, meta.block_table[i], seq_lens[i], k_scale, v_scale)
        return out

    def _forward_cuda(self, q, k, v, kv_cache, meta, k_scale, v_scale, rope):
        k_cache, v_cache = kv_cache
        if rope is not None:
            self._rope_and_write(q, k, v, k_cache, v_cache, meta.slot_mapping, rope.positions, rope.cos_sin_cache,
                                 k_scale, v_scale)
        else:
            self._write(k, v, k_cache, v_cache, meta.slot_mapping, k_scale, v_scale)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        self._attention(q, k_cache, v_cache, meta.block_table, meta.query_start_loc, meta.seq_lens, out,
                        meta.num_reqs, meta.max_query_len, self.scale, k_scale, v_scale)
        return out

    # ----- CPU -----
    def _keys(self, kv_cache: KVCache, block_ids: torch.Tensor, k_scale: float, v_scale: float):
        """K/V of the blocks, float32: [..., blocks * block_size, kv_heads, head_dim]."""
        k_cache, v_cache = kv_cache
        shape = (*block_ids.shape[:-1], -1, self.num_kv_heads, self.head_dim)
        keys = read_kv(gather_blocks(k_cache, block_ids.reshape(-1)).view(shape), k_scale, torch.float32)
        values = read_kv(gather_blocks(v_cache, block_ids.reshape(-1)).view(shape), v_scale, torch.float32)
        return keys, values

    def _queries(self, q: torch.Tensor) -> torch.Tensor:
        return q.float().view(q.shape[0], self.num_kv_heads, -1, self.head_dim)

    def _decodes(self, q, kv_cache, meta, seq_lens, k_scale, v_scale) -> torch.Tensor:
        """One-token queries of all decode requests in one pass, each over its own keys."""
        n = q.shape[0]
        block_size = kv_cache[0].shape[1]
        lengths = torch.tensor(seq_lens[:n], device=q.device)
        padded_len = -(-max(seq_lens[:n]) // KEY_TILE) * KEY_TILE
        num_blocks = min(-(-padded_len // block_size), meta.block_table.shape[1])
        keys, values = self._keys(kv_cache, meta.block_table[:n, :num_blocks], k_scale, v_scale)
        past_end = torch.arange(num_blocks * block_size, device=q.device)[None, :] >= lengths[:, None]
        keys = _padded(keys.masked_fill(past_end[..., None, None], 0.0), padded_len, 1)
        values = _padded(values.masked_fill(past_end[..., None, None], 0.0), padded_len, 1)
        out = attend_fixed_tiles(self._queries(q), keys, values, lengths, self.scale)
        return out.view(q.shape).to(q.dtype)

    def _request(self, q, kv_cache, block_row, seq_len, k_scale, v_scale) -> torch.Tensor:
        """A prefill or chunk: its rows share the request's keys."""
        block_size = kv_cache[0].shape[1]
        padded_len = -(-seq_len // KEY_TILE) * KEY_TILE
        keys, values = self._keys(kv_cache, block_row[: -(-seq_len // block_size)].unsqueeze(0), k_scale, v_scale)
        keys = _padded(keys[:, :seq_len], padded_len, 1)
        values = _padded(values[:, :seq_len], padded_len, 1)
        context = seq_len - q.shape[0]
        out = torch.empty(q.shape, dtype=torch.float32, device=q.device).view(q.shape[0], self.num_kv_heads, -1,
                                                                              self.head_dim)
        queries = self._queries(q)
        for first in range(0, q.shape[0], ROW_GROUP):
            last = min(first + ROW_GROUP, q.shape[0])
            key_end = torch.arange(context + first + 1, context + last + 1, device=q.device)
            out[first:last] = attend_fixed_tiles(queries[first:last], keys, values, key_end, self.scale)
        return out.view(q.shape).to(q.dtype)


def _host(host: torch.Tensor | None, device_tensor: torch.Tensor) -> torch.Tensor:
    return host if host is not None else device_tensor.cpu()
