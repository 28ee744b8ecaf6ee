"""The reference MLA backend: plain PyTorch. The CPU path, and what the Triton one is tested
against. Decodes are batched into two matmuls over the padded gathered rows (as the dense
reference does); prefills run one request at a time through `scaled_dot_product_attention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.mla_backend import ExpandLatent, MLABackend, gather_latent_rows, host_tensor
from tokenmill.model.layers.rotary_embedding import RotaryInputs, rotate_interleaved, rotate_neox
from tokenmill.ops.kv_quant import as_storage, is_fp8, quantize_fp8


class TorchNativeMLABackend(MLABackend):
    def rope_and_write(self, q, k_pe, latent, cache, slot_mapping, rope: RotaryInputs, kv_scale):
        nope = self.dims.qk_nope_head_dim
        rotate = rotate_interleaved if self.interleaved_rope else rotate_neox
        q_pe, k_rot = rotate(q[..., nope:], k_pe[:, None, :], rope)
        k_pe = k_rot[:, 0]
        rows = torch.cat([latent, k_pe], dim=-1)
        slots = slot_mapping[: rows.shape[0]]
        if slots.numel() and bool((slots < 0).any()):  # -1 marks padding tokens: nothing to write
            rows, slots = rows[slots >= 0], slots[slots >= 0]
        rows = quantize_fp8(rows, kv_scale) if is_fp8(cache) else rows.to(cache.dtype)
        as_storage(cache).view(-1, cache.shape[-1]).index_copy_(0, slots, as_storage(rows))
        return torch.cat([q[..., :nope], q_pe], dim=-1), k_pe

    def decode(self, q_latent, q_pe, cache, meta: AttentionMetadata, out, kv_scale) -> None:
        num_decodes = q_latent.shape[0]
        rank = self.dims.kv_lora_rank
        block_size = cache.shape[1]
        seq_lens = host_tensor(meta.seq_lens_cpu, meta.seq_lens)[:num_decodes]
        num_blocks = (int(seq_lens.max()) + block_size - 1) // block_size
        block_ids = meta.block_table[:num_decodes, :num_blocks].reshape(-1)
        # [B, L, rank + rope]: every head reads the same rows (multi-query attention).
        rows = gather_latent_rows(cache, block_ids, kv_scale, q_latent.dtype).view(num_decodes, -1, cache.shape[-1])
        latent, rope_key = rows[..., :rank], rows[..., rank:]
        scores = (torch.matmul(q_latent, latent.transpose(1, 2)) + torch.matmul(q_pe, rope_key.transpose(1, 2)))
        scores = scores.float() * self.scale  # [B, heads, L]
        positions = torch.arange(rows.shape[1], device=q_latent.device)
        scores.masked_fill_((positions[None, :] >= seq_lens.to(q_latent.device)[:, None])[:, None, :], float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num_(0.0).to(q_latent.dtype)  # (seq_len 0: zeros)
        out.copy_(torch.matmul(probs, latent))

    def prefill(self, q, latent, k_pe, cache, meta: AttentionMetadata, expand: ExpandLatent, kv_scale, out) -> None:
        dims = self.dims
        block_size = cache.shape[1]
        starts = host_tensor(meta.query_start_loc_cpu, meta.query_start_loc).tolist()
        seq_lens = host_tensor(meta.seq_lens_cpu, meta.seq_lens).tolist()
        for i in range(meta.num_decodes, meta.num_reqs):
            start, end, seq_len = starts[i], starts[i + 1], seq_lens[i]
            context_len = seq_len - (end - start)
            new_latent, new_pe = latent[start:end], k_pe[start:end]
            if context_len:
                blocks = meta.block_table[i, : (context_len + block_size - 1) // block_size]
                prefix = gather_latent_rows(cache, blocks, kv_scale, q.dtype)[:context_len]
                new_latent = torch.cat([prefix[:, : dims.kv_lora_rank], new_latent])
                new_pe = torch.cat([prefix[:, dims.kv_lora_rank:], new_pe])
            kv = expand(new_latent)  # [seq_len, heads, nope + v]
            keys = torch.cat([kv[..., : dims.qk_nope_head_dim],
                              new_pe[:, None, :].expand(-1, dims.num_heads, -1)], dim=-1)
            values = kv[..., dims.qk_nope_head_dim:]
            mask = None
            if context_len:
                mask = (torch.arange(seq_len, device=q.device)[None, :]
                        <= torch.arange(context_len, seq_len, device=q.device)[:, None])
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
                attn_mask=mask, is_causal=mask is None, scale=self.scale,
            ).transpose(0, 1)
