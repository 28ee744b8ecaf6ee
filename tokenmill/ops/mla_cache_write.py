"""MLA's cache write, fused with its rotary embedding: one Triton launch per layer, beside its
torch reference.

Per token, q's rope part (every head) and the shared rope key are rotated in place, and the
cache row `[latent | rotated rope key]` is written to the token's slot (slot -1 = skip the write,
for padding; the rotation still happens, as prefill reads this step's keys from `k_pe`). Into an
fp8 cache the row is stored as `(x / scale).clamp(-448, 448)` (`kv_quant.py`); the rotated key is
rounded to the model dtype first, as the reference writes what it rotated.

Two rotary layouts (`model/layers/rotary_embedding.py`): neox (dim i pairs with i + D_ROPE/2) and
interleaved (dims 2i and 2i + 1). Either way each thread loads the two members of its pairs and
stores them back to the same addresses, so rotating in place needs no barrier.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import FP8_MAX
from tokenmill.ops.kv_quant import as_storage, is_fp8, quantize_fp8


def rope_and_write_latent_ref(
    q_pe: torch.Tensor,  # [num_tokens, num_heads, d_rope]
    k_pe: torch.Tensor,  # [num_tokens, d_rope]
    latent: torch.Tensor,  # [num_tokens, d_latent]
    cache: torch.Tensor,  # [num_blocks, block_size, d_latent + d_rope]
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip
    positions: torch.Tensor,  # [num_tokens]
    cos_sin_cache: torch.Tensor,  # [max_position, d_rope]: cos | sin
    kv_scale: float,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated copies of q_pe and k_pe (float32 arithmetic, rounded once) and writes the
    cache rows in place."""
    half = cos_sin_cache.shape[1] // 2
    cos_sin = cos_sin_cache[positions.long()].float()
    cos, sin = cos_sin[:, None, :half], cos_sin[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        if interleaved:
            x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
            return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2).to(x.dtype)
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    q_rot, k_rot = rotate(q_pe), rotate(k_pe[:, None, :])[:, 0]
    rows = torch.cat([latent, k_rot], dim=-1)
    slots = slot_mapping[: rows.shape[0]]
    keep = slots >= 0
    rows = quantize_fp8(rows[keep], kv_scale) if is_fp8(cache) else rows[keep].to(cache.dtype)
    as_storage(cache).view(-1, cache.shape[-1]).index_copy_(0, slots[keep], as_storage(rows))
    return q_rot, k_rot


@triton.jit
def _rotate_pairs(x_ptr, row_offs, mask, cos, sin, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """Rotate the pairs of the rows at `row_offs` ([R, 1] element offsets) in place; returns the
    rotated members, rounded to x's dtype ([R, BLOCK_HALF] each)."""
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    if INTERLEAVED:
        ptr1 = x_ptr + row_offs + 2 * dims
        ptr2 = ptr1 + 1
    else:
        ptr1 = x_ptr + row_offs + dims
        ptr2 = ptr1 + HALF
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr2, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty)
    out2 = (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty)
    tl.store(ptr1, out1, mask=mask)
    tl.store(ptr2, out2, mask=mask)
    return out1, out2


@triton.jit
def _rope_and_write_latent_kernel(
    q_pe_ptr, k_pe_ptr, latent_ptr, cache_ptr, slot_mapping_ptr, positions_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_l_tok, stride_c_block, stride_c_slot, stride_cs_pos,
    kv_scale, num_heads,
    D_LATENT: tl.constexpr, HALF: tl.constexpr, PAGE: tl.constexpr, BLOCK_DL: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, INTERLEAVED: tl.constexpr, KV_FP8: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok).to(tl.int64)
    half_dims = tl.arange(0, BLOCK_HALF)
    half_mask = half_dims < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cs_pos + half_dims, mask=half_mask, other=0.0)[None, :]
    sin = tl.load(cos_sin_ptr + pos * stride_cs_pos + HALF + half_dims, mask=half_mask, other=0.0)[None, :]
    heads = tl.arange(0, BLOCK_HEADS)[:, None]
    _rotate_pairs(q_pe_ptr, tok * stride_q_tok + heads * stride_q_head, (heads < num_heads) & half_mask[None, :],
                  cos, sin, HALF, BLOCK_HALF, INTERLEAVED)
    k1, k2 = _rotate_pairs(k_pe_ptr, tok * stride_k_tok + tl.zeros([1, 1], tl.int64), half_mask[None, :],
                           cos, sin, HALF, BLOCK_HALF, INTERLEAVED)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    row_ptr = cache_ptr + (slot // PAGE) * stride_c_block + (slot % PAGE) * stride_c_slot
    dl = tl.arange(0, BLOCK_DL)
    latent = tl.load(latent_ptr + tok * stride_l_tok + dl, mask=dl < D_LATENT)
    if KV_FP8:
        # Saturate rather than overflow; div_rn rounds like torch's x / scale (bit-equal cache).
        latent = tl.clamp(tl.div_rn(latent.to(tl.float32), kv_scale), -FP8_MAX, FP8_MAX)
        k1 = tl.clamp(tl.div_rn(k1.to(tl.float32), kv_scale), -FP8_MAX, FP8_MAX)
        k2 = tl.clamp(tl.div_rn(k2.to(tl.float32), kv_scale), -FP8_MAX, FP8_MAX)
    tl.store(row_ptr + dl, latent.to(cache_ptr.dtype.element_ty), mask=dl < D_LATENT)
    if INTERLEAVED:
        k_ptr1 = row_ptr + D_LATENT + 2 * half_dims[None, :]
        k_ptr2 = k_ptr1 + 1
    else:
        k_ptr1 = row_ptr + D_LATENT + half_dims[None, :]
        k_ptr2 = k_ptr1 + HALF
    tl.store(k_ptr1, k1.to(cache_ptr.dtype.element_ty), mask=half_mask[None, :])
    tl.store(k_ptr2, k2.to(cache_ptr.dtype.element_ty), mask=half_mask[None, :])


def rope_and_write_latent(
    q_pe: torch.Tensor,  # [num_tokens, num_heads, d_rope], rotated in place (any token/head strides)
    k_pe: torch.Tensor,  # [num_tokens, d_rope], rotated in place (any token stride)
    latent: torch.Tensor,  # [num_tokens, d_latent]
    cache: torch.Tensor,  # [num_blocks, block_size, d_latent + d_rope]
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip the write (q/k still rotated)
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_position, d_rope]: cos first half, sin second half
    kv_scale: float = 1.0,  # fp8 cache only: stored = x / kv_scale
    interleaved: bool = False,
) -> None:
    """The reference's rotation and write (`rope_and_write_latent_ref`), in place, in one launch."""
    num_tokens, num_heads, d_rope = q_pe.shape
    d_latent = latent.shape[-1]
    if num_tokens == 0:
        return
    assert cache.shape[-1] == d_latent + d_rope and cos_sin_cache.shape[1] == d_rope and d_rope % 2 == 0
    assert q_pe.stride(-1) == 1 and k_pe.stride(-1) == 1 and latent.stride(-1) == 1 and cache.stride(-1) == 1
    half = d_rope // 2
    block_heads = triton.next_power_of_2(num_heads)
    _rope_and_write_latent_kernel[(num_tokens,)](
        q_pe, k_pe, latent, cache, slot_mapping, positions, cos_sin_cache,
        q_pe.stride(0), q_pe.stride(1), k_pe.stride(0), latent.stride(0), cache.stride(0), cache.stride(1),
        cos_sin_cache.stride(0), float(kv_scale), num_heads,
        D_LATENT=d_latent, HALF=half, PAGE=cache.shape[1], BLOCK_DL=triton.next_power_of_2(d_latent),
        BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HEADS=block_heads, INTERLEAVED=interleaved,
        KV_FP8=is_fp8(cache), num_warps=4 if block_heads * half <= 2048 else 8,
    )
