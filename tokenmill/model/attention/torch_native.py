"""The reference attention backend: plain PyTorch, reads K/V through the block table.

It is the CPU path and the reference every other backend is tested against, so it favours
clarity, but it batches all decodes into one `scaled_dot_product_attention` call so the CPU is not
drowned in per-request launches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    AttentionMetadataBuilder,
    KVCache,
    StepBatch,
)
from tokenmill.model.layers.rotary_embedding import RotaryInputs, rotate_neox
from tokenmill.ops.kv_quant import as_storage, is_fp8, quantize_fp8, read_kv


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor,
                   k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Scatter the step's K/V ([num_tokens, num_kv_heads, head_dim]) into their slots; an fp8
    cache stores them divided by `k_scale` / `v_scale`."""
    k_cache, v_cache = kv_cache
    num_kv_heads, head_dim = k_cache.shape[-2:]
    slots = slot_mapping[: k.shape[0]]
    if slots.numel() and bool((slots < 0).any()):  # -1 marks padding tokens: nothing to write
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    if is_fp8(k_cache):
        k, v = quantize_fp8(k, k_scale), quantize_fp8(v, v_scale)
    else:
        k, v = k.to(k_cache.dtype), v.to(v_cache.dtype)
    k_flat = as_storage(k_cache).view(-1, num_kv_heads, head_dim)
    v_flat = as_storage(v_cache).view(-1, num_kv_heads, head_dim)
    k_flat.index_copy_(0, slots, as_storage(k))
    v_flat.index_copy_(0, slots, as_storage(v))


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache[block_ids] in the cache's dtype: [len(block_ids), block_size, num_kv_heads, head_dim]."""
    return as_storage(cache).index_select(0, block_ids).view(cache.dtype)


def gather_kv(kv_cache: KVCache, block_ids: torch.Tensor, num_tokens: int, k_scale: float, v_scale: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V of the first `num_tokens` tokens of one request in `dtype`: [num_tokens, num_kv_heads, head_dim]."""
    k_cache, v_cache = kv_cache
    num_kv_heads, head_dim = k_cache.shape[-2:]
    k = gather_blocks(k_cache, block_ids).view(-1, num_kv_heads, head_dim)[:num_tokens]
    v = gather_blocks(v_cache, block_ids).view(-1, num_kv_heads, head_dim)[:num_tokens]
    return read_kv(k, k_scale, dtype), read_kv(v, v_scale, dtype)


class TorchNativeMetadataBuilder(AttentionMetadataBuilder):
    def build(self, batch: StepBatch, common_prefix_len: int = 0) -> AttentionMetadata:
        return batch.meta


class TorchNativeBackend(AttentionBackend):
    name = "torch_native"

    @staticmethod
    def builder_class() -> type[AttentionMetadataBuilder]:
        return TorchNativeMetadataBuilder

    def forward(self, q, k, v, kv_cache, meta: AttentionMetadata, k_scale: float = 1.0, v_scale: float = 1.0,
                rope: RotaryInputs | None = None) -> torch.Tensor:
        if rope is not None:
            q, k = rotate_neox(q, k, rope)
        write_kv_cache(k, v, kv_cache, meta.slot_mapping, k_scale, v_scale)
        kv_scales = (k_scale, v_scale)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], kv_cache, meta, kv_scales)
        if meta.num_prefills:
            self._prefill(q, k, v, kv_cache, meta, kv_scales, out)
        return out

    def _first_key(self, query_pos: int) -> int:
        """The first key position the query at `query_pos` attends."""
        return 0 if self.sliding_window is None else max(0, query_pos - self.sliding_window + 1)

    def _decode(self, q: torch.Tensor, kv_cache: KVCache, meta: AttentionMetadata,
                kv_scales: tuple[float, float]) -> torch.Tensor:
        """All one-token queries at once: gather each request's blocks into a padded batch and
        attend with two batched matmuls. With a sliding window each row gathers only the blocks
        from its window's first key on (the blocks before it may be freed).

        Plain matmuls beat `scaled_dot_product_attention` here: its CPU flash kernel is built for
        long query blocks and spends most of its time on bookkeeping for a single query row.
        """
        k_cache, v_cache = kv_cache
        block_size, num_kv_heads, head_dim = k_cache.shape[1:]
        num_decodes, num_heads = q.shape[0], q.shape[1]
        group = num_heads // num_kv_heads
        seq_lens = _host(meta.seq_lens_cpu, meta.seq_lens)[:num_decodes].long()
        first_keys = torch.zeros_like(seq_lens) if self.sliding_window is None else \
            (seq_lens - self.sliding_window).clamp(min=0)
        first_blocks = first_keys // block_size
        num_blocks = int(((seq_lens + block_size - 1) // block_size - first_blocks).max())
        table = meta.block_table[:num_decodes]
        # Row i's columns first_blocks[i] ...; columns past its last block are padding, masked below.
        columns = (first_blocks[:, None] + torch.arange(num_blocks)[None, :]).clamp(max=table.shape[1] - 1)
        block_ids = table.gather(1, columns.to(table.device)).reshape(-1)
        # [B, num_blocks * block_size, kv_heads, head_dim] -> [B, kv_heads, L, head_dim]
        keys = gather_blocks(k_cache, block_ids).view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
        values = gather_blocks(v_cache, block_ids).view(num_decodes, -1, num_kv_heads, head_dim).transpose(1, 2)
        keys, values = read_kv(keys, kv_scales[0], q.dtype), read_kv(values, kv_scales[1], q.dtype)
        query = q.view(num_decodes, num_kv_heads, group, head_dim)  # GQA: a head group per KV head
        scores = torch.matmul(query, keys.transpose(2, 3)).float() * self.scale  # [B, kv, g, L]
        key_pos = (first_blocks * block_size)[:, None] + torch.arange(keys.shape[2])[None, :]  # [B, L]
        outside = (key_pos >= seq_lens[:, None]) | (key_pos < first_keys[:, None])
        scores.masked_fill_(outside.to(q.device)[:, None, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, values)  # [B, kv, g, head_dim]
        return out.view(num_decodes, num_heads, head_dim)

    def _prefill(self, q, k, v, kv_cache: KVCache, meta: AttentionMetadata,
                 kv_scales: tuple[float, float], out: torch.Tensor) -> None:
        """Prefills and prefill chunks one request at a time (there are few per step). The cached
        prefix comes from the cache (from the first block the chunk's first query's window
        reaches), the chunk's own K/V from k/v (exact even with an fp8 cache), as in the Triton
        prefill."""
        block_size = kv_cache[0].shape[1]
        num_heads = q.shape[1]
        window = self.sliding_window
        starts = _host(meta.query_start_loc_cpu, meta.query_start_loc).tolist()
        seq_lens = _host(meta.seq_lens_cpu, meta.seq_lens).tolist()
        for i in range(meta.num_decodes, meta.num_reqs):
            start, end, seq_len = starts[i], starts[i + 1], seq_lens[i]
            query_len = end - start
            context_len = seq_len - query_len
            if context_len == 0 and meta.causal and window is None:
                keys, values = k[start:end], v[start:end]  # nothing cached before: no gather
                mask, is_causal = None, True
            else:
                first_block = self._first_key(context_len) // block_size
                first_key = min(first_block * block_size, context_len)
                num_blocks = (context_len + block_size - 1) // block_size - first_block
                prefix_k, prefix_v = gather_kv(kv_cache, meta.block_table[i, first_block:first_block + num_blocks],
                                               context_len - first_key, *kv_scales, q.dtype)
                keys = torch.cat([prefix_k, k[start:end].to(q.dtype)])
                values = torch.cat([prefix_v, v[start:end].to(q.dtype)])
                is_causal = False
                if meta.causal:
                    key_pos = torch.arange(first_key, seq_len, device=q.device)
                    query_pos = torch.arange(context_len, seq_len, device=q.device)
                    mask = key_pos[None, :] <= query_pos[:, None]
                    if window is not None:
                        mask &= key_pos[None, :] > query_pos[:, None] - window
                else:
                    mask = None
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1).unsqueeze(0),
                keys.to(q.dtype).transpose(0, 1).unsqueeze(0),
                values.to(q.dtype).transpose(0, 1).unsqueeze(0),
                attn_mask=mask, is_causal=is_causal, scale=self.scale,
                enable_gqa=num_heads != keys.shape[1],
            ).squeeze(0).transpose(0, 1)


def _host(host: torch.Tensor | None, device_tensor: torch.Tensor) -> torch.Tensor:
    return host if host is not None else device_tensor.cpu()
