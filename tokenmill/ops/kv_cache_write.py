"""Writing the step's K/V into the paged cache, as Triton kernels.

Layouts: k/v `[num_tokens, num_kv_heads, head_dim]` (any token/head strides, last dim contiguous),
K/V caches `[num_blocks, block_size, num_kv_heads, head_dim]`, slot mapping `[num_tokens]` int64.

- `write_kv_cache`: scatters the step's K/V into their slots (slot -1 = skip, for padding); into an
  fp8 cache as `(x / scale).clamp(-448, 448)`, the format of `kv_quant.py`.
- `rope_and_write_kv_cache`: `rope_neox_` (`rotary.py`) on q and k in place, then
  `write_kv_cache`, in one launch instead of two (a launch per layer saved at decode); the
  results are bit-identical to the two ops run in turn. Given Qwen3's per-head q/k RMSNorm
  weights it normalises q and k first, bit-identical to `rms_norm` (`rms_norm.py`) on each: one
  launch a layer where the norms would add two.

Launchers size their grids from Python ints and never read device values on the host, so they can
be captured in CUDA graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import FP8_MAX, check_cache
from tokenmill.ops.rotary import _rope_neox_kernel, rope_launch_meta
from tokenmill.ops.pdl import launch_options, pdl_enter
from tokenmill.ops.rms_norm import rms_norm_heads_


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    src_k = k_ptr + tok.to(tl.int64) * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :]
    src_v = v_ptr + tok.to(tl.int64) * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :]
    dst = (slot // PAGE) * stride_c_block + (slot % PAGE) * stride_c_slot
    dst_offs = dst + heads[:, None] * stride_c_head + dims[None, :]
    k = tl.load(src_k, mask=mask)
    v = tl.load(src_v, mask=mask)
    if KV_FP8:
        # Saturate rather than overflow; div_rn rounds like torch's x / scale (bit-equal cache).
        k = tl.clamp(tl.div_rn(k.to(tl.float32), k_scale), -FP8_MAX, FP8_MAX)
        v = tl.clamp(tl.div_rn(v.to(tl.float32), v_scale), -FP8_MAX, FP8_MAX)
    tl.store(k_cache_ptr + dst_offs, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst_offs, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip
    k_scale: float = 1.0,  # fp8 cache only: stored = k / k_scale
    v_scale: float = 1.0,
) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v need a contiguous last dim"
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8, num_warps=4,
    )


@triton.jit
def _rope_and_write_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    q_norm_ptr, k_norm_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, stride_cs_pos,
    stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, num_heads, head_dim, norm_eps,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    KV_FP8: tl.constexpr, QK_NORM: tl.constexpr = False, PDL: tl.constexpr = False,
):
    pdl_enter(PDL)
    if QK_NORM:
        # Normalise this token's heads in place and round them to the model dtype, as the norm
        # kernel leaves them; the rotation then reads them back like any q/k (after the barrier:
        # its tiles are laid out differently, so a thread may read what another one stored).
        # `head_dim` is the runtime copy of HEAD_DIM: the norm kernel divides by a runtime value.
        tok = tl.program_id(0).to(tl.int64)
        rms_norm_heads_(q_ptr + tok * stride_q_tok, stride_q_head, num_heads, q_norm_ptr, head_dim, norm_eps,
                        BLOCK_HEADS=BLOCK_Q_HEADS, BLOCK_D=BLOCK_D)
        rms_norm_heads_(k_ptr + tok * stride_k_tok, stride_k_head, NUM_KV_HEADS, k_norm_ptr, head_dim, norm_eps,
                        BLOCK_HEADS=BLOCK_H, BLOCK_D=BLOCK_D)
        tl.debug_barrier()
    # The two kernels' bodies in turn (a JIT function called from another is inlined), so the
    # math and rounding are theirs by construction. Rotate q and k in place, token
    # `program_id(0)`, for every token: slot -1 only skips the cache write, and prefill reads
    # this step's keys from k, so k must end up rotated.
    _rope_neox_kernel(
        q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
        stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs_pos,
        num_heads, NUM_KV_HEADS,
        HALF=HALF, BLOCK_HALF=BLOCK_HALF, BLOCK_Q_HEADS=BLOCK_Q_HEADS, BLOCK_K_HEADS=BLOCK_H,
    )
    # The write reads k back from memory, in a tile laid out differently from the rotation's, so
    # a thread may load what another one stored: the barrier makes the CTA's stores visible
    # (global memory, as __syncthreads). Reading back, rather than reusing the rotated float32
    # registers, writes k rounded to the model dtype first, as the unfused ops do.
    tl.debug_barrier()
    _write_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
        stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
        stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale,
        NUM_KV_HEADS=NUM_KV_HEADS, HEAD_DIM=HEAD_DIM, PAGE=PAGE, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        KV_FP8=KV_FP8,
    )


def rope_and_write_kv_cache(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], rotated in place
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [>= num_tokens] int64, -1 = skip the write (q/k still rotated)
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos first half, sin second half
    k_scale: float = 1.0,  # fp8 cache only: stored = k / k_scale
    v_scale: float = 1.0,
    pdl: bool = False,
    q_norm_weight: torch.Tensor | None = None,  # [head_dim]: RMSNorm each q head first
    k_norm_weight: torch.Tensor | None = None,  # [head_dim]: and each k head (both or neither)
    qk_norm_eps: float = 1e-6,
) -> None:
    """`rope_neox_(q, k, positions, cos_sin_cache)` then `write_kv_cache(k, v, ...)` in one launch,
    with bit-identical results; dims past rotary_dim are left alone (partial rotary). With the norm
    weights, q and k are first replaced in place by `rms_norm(q, q_norm_weight, qk_norm_eps)` and
    `rms_norm(k, k_norm_weight, qk_norm_eps)` (`rms_norm.py`), bit for bit. `pdl`: launched
    dependent on the kernel before (`ops/pdl.py`)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    rope_meta = rope_launch_meta(q, k, cos_sin_cache)
    assert v.shape[2] == head_dim and v.stride(-1) == 1
    qk_norm = q_norm_weight is not None
    assert qk_norm == (k_norm_weight is not None), "q and k norm weights come together"
    if qk_norm:
        assert q_norm_weight.shape == (head_dim,) and k_norm_weight.shape == (head_dim,)
        assert q_norm_weight.stride(0) == 1 and k_norm_weight.stride(0) == 1
    if num_tokens == 0:
        return
    kv_fp8 = check_cache(k_cache, v_cache)
    # Every argument is fixed for a model's life (shapes, strides of the qkv views, scales), and the
    # step's token count is only the grid: nothing here recompiles from one step to the next.
    _rope_and_write_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q_norm_weight, k_norm_weight,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), float(k_scale), float(v_scale), num_heads,
        head_dim, float(qk_norm_eps),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1], HALF=rope_meta["HALF"],
        BLOCK_HALF=rope_meta["BLOCK_HALF"], BLOCK_Q_HEADS=rope_meta["BLOCK_Q_HEADS"],
        BLOCK_H=rope_meta["BLOCK_K_HEADS"], BLOCK_D=triton.next_power_of_2(head_dim),
        KV_FP8=kv_fp8, QK_NORM=qk_norm, PDL=pdl, num_warps=rope_meta["num_warps"], **launch_options(pdl),
    )
