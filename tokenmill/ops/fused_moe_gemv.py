"""The routed experts for a handful of tokens (batch-1 decode): two GEMV-style kernels, token by
token, with no alignment step and no separate top-k sum.

At one token the grouped GEMMs of `fused_moe.py` pay for four launches beyond the two products
(alignment, top-k sum) and multiply 16-row blocks that hold one real row. Here:

1. Gate/up: one program per (entry, tile of `BLOCK_N` intermediate rows) streams its expert's gate
   and up rows once, against the token's hidden state, and writes `silu(gate) * up`.
2. Down: one program per (token, tile of `BLOCK_N` hidden rows) reads those rows of all the token's
   k experts at once, each a GEMV against its entry's activations scaled by the routing weight,
   and writes the sum: the top-k sum happens in registers.

fp8 experts (`scales`): weight-only, as the dense fp8 GEMV (`fp8_gemv.py`): the activations stay
in the model dtype and each weight element is multiplied by its scale: with block scales a
program's rows lie in one row block (BLOCK_N divides it), so the scale of each K element is folded
into the activation as it is loaded; channel scales multiply each row's sum.

Two tokens choosing the same expert read its rows twice, so this path is for a few tokens only
(`fused_moe.fused_experts` picks it); the rows are streamed with `evict_first`, as the dense GEMV
(`gemv.py`) streams its weights. Tile sizes and warps: `fused_moe_configs.MoeGemvConfig`, measured
per GPU and expert shape. With `pdl` both kernels launch dependent (`pdl.py`). The gate/up kernel
waits first, since even the rows it reads depend on the routing just before it. The down kernel
reads the routing and its first weight tile before it waits: the routing is two kernels back,
and the gate/up kernel's programs let it launch only once they have waited for it
(`pdl.pdl_enter`), so only the activations need the wait. Rounding as the reference: gate and
up rounded to the model dtype, SiLU rounded, the product rounded; each expert's down output
rounded, weighted, rounded, then the k terms summed in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.fp8_format import ExpertScales
from tokenmill.ops.fused_moe_configs import MoeGemvConfig, moe_gemv_config
from tokenmill.ops.pdl import launch_options, pdl_enter


@triton.jit
def _expert_of(ids_ptr, map_ptr, entry, HAS_MAP: tl.constexpr):
    """(local expert, whether this rank holds it) of `entry`; an expert held elsewhere reads as 0
    and its rows are masked off (the masks below compare against limits that are 0 then)."""
    expert = tl.load(ids_ptr + entry)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert)
    return tl.maximum(expert, 0).to(tl.int64), expert >= 0


@triton.jit
def _gate_up_gemv_kernel(x_ptr, w13_ptr, ids_ptr, map_ptr, act_ptr, inter, hidden, stride_we, stride_wn,
                         s_ptr, stride_se, stride_sn,
                         TOP_K: tl.constexpr, HAS_MAP: tl.constexpr, SCALES: tl.constexpr, BLOCKWISE: tl.constexpr,
                         SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    entry = tl.program_id(0).to(tl.int64)
    first_row = tl.program_id(1) * BLOCK_N
    rows = first_row + tl.arange(0, BLOCK_N)
    expert, held = _expert_of(ids_ptr, map_ptr, entry, HAS_MAP)
    row_ok = rows < tl.where(held, inter, 0)
    cols = tl.arange(0, BLOCK_K)
    gate_ptrs = w13_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn + cols[None, :]
    up_offset = inter * stride_wn
    x_row = x_ptr + (entry // TOP_K) * hidden
    # (SCALES) BLOCKWISE: the gate rows' and the up rows' row of block scales; else their channel scales.
    gate_scales = s_ptr + expert * stride_se + ((first_row // SCALE_BLOCK_N) * stride_sn).to(tl.int64)
    up_scales = s_ptr + expert * stride_se + (((first_row + inter) // SCALE_BLOCK_N) * stride_sn).to(tl.int64)
    acc_gate = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, hidden, BLOCK_K):
        k_ok = (k + cols) < hidden
        x = tl.load(x_row + k + cols, mask=k_ok, other=0.0).to(tl.float32)
        x_gate = x
        x_up = x
        if SCALES and BLOCKWISE:
            x_gate = x * tl.load(gate_scales + (k + cols) // SCALE_BLOCK_K, mask=k_ok, other=0.0)
            x_up = x * tl.load(up_scales + (k + cols) // SCALE_BLOCK_K, mask=k_ok, other=0.0)
        mask = row_ok[:, None] & k_ok[None, :]
        acc_gate += (tl.load(gate_ptrs + k, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
                     * x_gate[None, :])
        acc_up += (tl.load(gate_ptrs + up_offset + k, mask=mask, other=0.0,
                           eviction_policy="evict_first").to(tl.float32) * x_up[None, :])
    gate_sum = tl.sum(acc_gate, axis=1)
    up_sum = tl.sum(acc_up, axis=1)
    if SCALES and not BLOCKWISE:
        channel = s_ptr + expert * stride_se + rows.to(tl.int64) * stride_sn
        gate_sum = gate_sum * tl.load(channel, mask=row_ok, other=0.0)
        up_sum = up_sum * tl.load(channel + inter * stride_sn, mask=row_ok, other=0.0)
    dtype = act_ptr.dtype.element_ty
    gate = gate_sum.to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up_sum.to(dtype).to(tl.float32)
    tl.store(act_ptr + entry * inter + rows, act.to(dtype), mask=rows < inter)


@triton.jit
def _down_gemv_kernel(act_ptr, w2_ptr, ids_ptr, map_ptr, weights_ptr, out_ptr, hidden, inter, stride_we, stride_wn,
                      s_ptr, stride_se, stride_sn,
                      TOP_K: tl.constexpr, TOP_K_POW2: tl.constexpr, HAS_MAP: tl.constexpr, SCALES: tl.constexpr,
                      BLOCKWISE: tl.constexpr, SCALE_BLOCK_N: tl.constexpr, SCALE_BLOCK_K: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    # The k experts are one axis of the tile ([k, BLOCK_N, BLOCK_K]), not a loop: their rows are
    # independent loads in flight together (as a loop over experts, one expert's slice is in flight
    # and the GEMV reads at ~40% of the copy rate; as a tile ~60%: Qwen3-30B-A3B, H100, perf.md).
    token = tl.program_id(0).to(tl.int64)
    first_row = tl.program_id(1) * BLOCK_N
    rows = first_row + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    slot = tl.arange(0, TOP_K_POW2)
    slot_ok = slot < TOP_K
    entries = token * TOP_K + slot
    expert = tl.load(ids_ptr + entries, mask=slot_ok, other=0)
    if HAS_MAP:
        expert = tl.load(map_ptr + expert, mask=slot_ok, other=-1)
    held = slot_ok & (expert >= 0)
    expert = tl.maximum(expert, 0).to(tl.int64)
    k_limit = tl.where(held, inter, 0)  # an expert held elsewhere (or a padding slot) reads nothing
    row_ok = rows < hidden
    w_ptrs = (w2_ptr + expert[:, None, None] * stride_we + rows[None, :, None].to(tl.int64) * stride_wn
              + cols[None, None, :])
    act_ptrs = act_ptr + entries[:, None] * inter + cols[None, :]
    block_scales = s_ptr + expert[:, None] * stride_se + ((first_row // SCALE_BLOCK_N) * stride_sn).to(tl.int64)
    acc = tl.zeros((TOP_K_POW2, BLOCK_N), dtype=tl.float32)
    k_begin = 0
    if PDL:  # the first tile's rows before the wait (the routing is not the kernel before's: see above)
        k_ok = cols[None, :] < k_limit[:, None]
        w = tl.load(w_ptrs, mask=k_ok[:, None, :] & row_ok[None, :, None], other=0.0, eviction_policy="evict_first")
        pdl_enter(PDL)
        acc += tl.sum(w.to(tl.float32) * _down_activations(act_ptrs, block_scales, 0, cols, k_ok, SCALES, BLOCKWISE,
                                                           SCALE_BLOCK_K)[:, None, :], axis=2)
        k_begin = BLOCK_K
    for k in range(k_begin, inter, BLOCK_K):
        k_ok = (k + cols)[None, :] < k_limit[:, None]
        w = tl.load(w_ptrs + k, mask=k_ok[:, None, :] & row_ok[None, :, None], other=0.0,
                    eviction_policy="evict_first")
        acc += tl.sum(w.to(tl.float32) * _down_activations(act_ptrs, block_scales, k, cols, k_ok, SCALES, BLOCKWISE,
                                                           SCALE_BLOCK_K)[:, None, :], axis=2)
    if SCALES and not BLOCKWISE:
        acc = acc * tl.load(s_ptr + expert[:, None] * stride_se + rows[None, :].to(tl.int64) * stride_sn,
                            mask=held[:, None] & row_ok[None, :], other=0.0)
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + entries, mask=held, other=0.0)
    terms = (acc.to(dtype).to(tl.float32) * weight[:, None]).to(dtype).to(tl.float32)
    tl.store(out_ptr + token * hidden + rows, tl.sum(terms, axis=0).to(dtype), mask=row_ok)


@triton.jit
def _down_activations(act_ptrs, block_scales, k, cols, k_ok, SCALES: tl.constexpr, BLOCKWISE: tl.constexpr,
                      SCALE_BLOCK_K: tl.constexpr):
    """Columns k .. k + BLOCK_K of the k experts' activations ([TOP_K_POW2, BLOCK_K] float32), each
    times its weights' block scale (fp8 block scales)."""
    a = tl.load(act_ptrs + k, mask=k_ok, other=0.0).to(tl.float32)
    if SCALES and BLOCKWISE:
        a = a * tl.load(block_scales + (k + cols)[None, :] // SCALE_BLOCK_K, mask=k_ok, other=0.0)
    return a


def _down_block(top_k: int, config: MoeGemvConfig) -> tuple[int, int]:
    """(TOP_K_POW2, BLOCK_N) of the down kernel: `config.down_rows` rows of all experts together
    per program (32 at top-8: 4 hidden rows of each; at top-2: 16)."""
    pow2 = triton.next_power_of_2(top_k)
    return pow2, max(config.down_rows // pow2, 1)


def _scale_args(scale: torch.Tensor | None, block: tuple[int, int] | None, block_n: int,
                like: torch.Tensor) -> tuple[tuple, dict]:
    """The scale pointer and strides, and the SCALES / BLOCKWISE constexprs, of one weight."""
    if scale is None:
        return (like, 0, 0), dict(SCALES=False, BLOCKWISE=False, SCALE_BLOCK_N=1, SCALE_BLOCK_K=1)
    if block is not None:
        assert block[0] % block_n == 0, "a program's rows must share one row of block scales"
        return ((scale, scale.stride(0), scale.stride(1)),
                dict(SCALES=True, BLOCKWISE=True, SCALE_BLOCK_N=block[0], SCALE_BLOCK_K=block[1]))
    return (scale, scale.stride(0), scale.stride(1)), dict(SCALES=True, BLOCKWISE=False, SCALE_BLOCK_N=1,
                                                           SCALE_BLOCK_K=1)


def fused_experts_gemv(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                       topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                       scales: ExpertScales | None = None, config: MoeGemvConfig | None = None,
                       pdl: bool = False) -> torch.Tensor:
    """As `fused_moe.fused_experts` (same arguments, contiguous), for a few tokens; fp8 experts
    (`scales`) weight-only. `config`: the launch configuration (default: the measured one for
    this shape and GPU, `fused_moe_configs.moe_gemv_config`); `pdl`: launched dependent."""
    num_tokens, hidden_size = hidden.shape
    inter = w2.shape[2]
    top_k = topk_ids.shape[1]
    if config is None:
        config = moe_gemv_config(w13.shape[0], top_k, hidden_size, inter, w13.dtype, hidden.device)
    act = torch.empty(num_tokens * top_k, inter, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty_like(hidden)
    map_arg = expert_map if expert_map is not None else topk_ids  # not read without HAS_MAP
    block = scales.block if scales is not None else None
    bn = config.gate_up_block_n
    s_args, s_meta = _scale_args(scales.w13 if scales is not None else None, block, bn, act)
    _gate_up_gemv_kernel[(num_tokens * top_k, triton.cdiv(inter, bn))](
        hidden, w13, topk_ids, map_arg, act, inter, hidden_size, w13.stride(0), w13.stride(1), *s_args,
        TOP_K=top_k, HAS_MAP=expert_map is not None, **s_meta, BLOCK_N=bn, BLOCK_K=config.gate_up_block_k,
        PDL=pdl, num_warps=config.gate_up_warps, **launch_options(pdl))
    pow2, bn = _down_block(top_k, config)
    s_args, s_meta = _scale_args(scales.w2 if scales is not None else None, block, bn, act)
    _down_gemv_kernel[(num_tokens, triton.cdiv(hidden_size, bn))](
        act, w2, topk_ids, map_arg, topk_weights, out, hidden_size, inter, w2.stride(0), w2.stride(1), *s_args,
        TOP_K=top_k, TOP_K_POW2=pow2, HAS_MAP=expert_map is not None, **s_meta, BLOCK_N=bn,
        BLOCK_K=config.down_block_k, PDL=pdl, num_warps=config.down_warps, **launch_options(pdl))
    return out
