"""Pieces shared by the Triton attention kernels: launch configs, the paged K/V tile load and
one step of online softmax."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tokenmill.ops.kv_quant import FP8_E4M3_MAX, is_fp8

# exp2 is one instruction on the GPU; exp(x) = exp2(x * log2(e)).
LOG2E = 1.4426950408889634
FP8_MAX = tl.constexpr(FP8_E4M3_MAX)


@dataclass(frozen=True, slots=True)
class LaunchConfig:
    """Tile shape and launch knobs of one kernel (block_m is unused by decode)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@triton.jit
def load_kv_tile(
    k_cache_ptr, v_cache_ptr, block_row_ptr, token_offs, token_mask, kv_head, dims, dim_mask,
    stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE: tl.constexpr,
    KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr,
):
    """K and V of the tokens `token_offs` of one request and one KV head: [BLOCK_N, BLOCK_D] each.

    An fp8 cache with scales other than 1.0 (KV_SCALED) is dequantized to float32 here. With unit
    scales (uncalibrated, the default) the fp8 tiles are returned as they are and converted
    straight to the model dtype for the dot products (`online_softmax_step`): the same values,
    since every e4m3 value is exact in bf16 and fp16, without a float32 tile and two extra
    conversions per element in a kernel whose prefill form is otherwise bound by the dots."""
    block_ids = tl.load(block_row_ptr + token_offs // PAGE, mask=token_mask, other=0).to(tl.int64)
    rows = block_ids * stride_c_block + (token_offs % PAGE) * stride_c_slot + kv_head * stride_c_head
    offs = rows[:, None] + dims[None, :]
    mask = token_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_cache_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_cache_ptr + offs, mask=mask, other=0.0)
    if KV_FP8 and KV_SCALED:  # constexpr branches: other caches compile without it
        k = k.to(tl.float32) * k_scale
        v = v.to(tl.float32) * v_scale
    return k, v


@triton.jit
def model_dot(a, b):
    """`tl.dot` for the model's dtype: float32 operands multiply as IEEE float32 (Triton's default
    rounds them to TF32, 10 mantissa bits, which at a float32 model's attention scores moves a
    greedy token); bf16 / fp16 operands use the tensor cores as always. A static branch."""
    if a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def online_softmax_step(q, k, v, score_mask, m_i, l_i, acc, scale_log2):
    """Fold one tile into the running (max, sum, accumulator); scores in the log2 domain."""
    s = model_dot(q, tl.trans(k.to(q.dtype))) * scale_log2
    s = tl.where(score_mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 there so no NaN appears.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + model_dot(p.to(q.dtype), v.to(q.dtype))
    return m_new, l_i, acc


@triton.jit
def attend_kv_range(
    q, k_cache_ptr, v_cache_ptr, block_row_ptr, first_token, tile_begin, tile_end, end, kv_head, dims,
    dim_mask, stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, scale_log2, m_i, l_i, acc,
    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, KV_FP8: tl.constexpr, KV_SCALED: tl.constexpr,
):
    """Fold the cached tokens of tiles [tile_begin, tile_end) counted from `first_token` (tokens
    at or past `end` masked) into the running softmax of `q`: the decode kernels' main loop."""
    for tile in range(tile_begin, tile_end):
        offs_n = first_token + tile * BLOCK_N + tl.arange(0, BLOCK_N)
        key_mask = offs_n < end
        k, v = load_kv_tile(
            k_cache_ptr, v_cache_ptr, block_row_ptr, offs_n, key_mask, kv_head, dims, dim_mask,
            stride_c_block, stride_c_slot, stride_c_head, k_scale, v_scale, PAGE, KV_FP8, KV_SCALED,
        )
        m_i, l_i, acc = online_softmax_step(q, k, v, key_mask[None, :], m_i, l_i, acc, scale_log2)
    return m_i, l_i, acc


@triton.jit
def finish_softmax(m_i, l_i, acc):
    """(normalised output, log2-sum-exp) of a running softmax, for a split-KV merge. A row that
    saw no key (l = 0: padding, an empty range) gives output 0 and lse -inf, weight 0 in a merge."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    return acc / l_safe[:, None], tl.where(has_keys, m_i + tl.log2(l_safe), float("-inf"))


def dequantize_to_float32(kv_fp8: bool, k_scale: float, v_scale: float) -> bool:
    """The KV_SCALED flag of `load_kv_tile`: an fp8 cache whose scales are not both 1.0."""
    return kv_fp8 and (k_scale, v_scale) != (1.0, 1.0)


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Asserts the layout the kernels assume; returns whether the cache is fp8 (the KV_FP8 flag)."""
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride(), \
        "k_cache and v_cache must share shape and strides"
    assert k_cache.dtype == v_cache.dtype, "k_cache and v_cache must share a dtype"
    assert k_cache.stride(-1) == 1, "the cache's head_dim must be contiguous"
    return is_fp8(k_cache)
