"""The fused mixture-of-experts kernels: the routed experts of a MoE layer in two grouped GEMMs.

`fused_experts(hidden, w13, w2, topk_weights, topk_ids)` computes, for every token t and each of
its k chosen experts e, `w_te * down_e(silu(gate_e(x_t)) * up_e(x_t))`, summed over the k. Its
reference is the plain-torch path of the layer (`model/layers/moe/fused_moe.experts_ref`); the
tests hold the two together.

1. `moe_align.py` lays the T * k (token, expert) *entries* out expert by expert in blocks of
   `block_m` rows.
2. Grouped GEMM 1: each program takes one block (one expert) and a column tile of the
   intermediate dimension, gathers the block's token rows of `hidden`, multiplies them by that
   expert's gate and up rows together (one pass over the shared activations) and writes
   `silu(gate) * up` per entry: the activation never makes a round trip through memory.
3. Grouped GEMM 2: the same blocks, the intermediate rows times the expert's down projection,
   scaled by the entry's routing weight, written per entry.
4. The k rows of each token are summed: with `sum_counters` (decode batches) by GEMM 2 itself,
   in the program that stores a token's last row of a column tile (an arrival counter per token
   and tile, as the split-KV decode merges), in entry order whichever program that is, so
   deterministic; else by `torch.sum` over the entry axis afterwards (one launch more).

Up to `GEMV_MAX_TOKENS` tokens (batch-1 decode), `fused_moe_gemv.py` does the same in two
GEMV-style launches instead (no alignment, the top-k sum in registers).

fp8 experts (`scales`, block-FP8 checkpoints or online fp8): both grouped GEMMs run on the fp8
tensor cores, each input quantised per token and group first (`fp8_quant.py`), the weights' block
(or channel) scales applied as `fp8_gemm.py` applies them; the reference is `fused_experts_fp8_ref`.

Programs whose block lies past the used blocks return at once, so sizes (grid, buffers) depend
only on T, k and the shapes: no host sync, CUDA-graph capturable. Experts no token chose get no
block and cost nothing. Rounding follows HF's experts (gate and up rounded to the model dtype,
then SiLU, then the product, each rounded; the down projection rounded before the weight
multiplies it); float32 models multiply in IEEE float32 (no TF32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.fp8_format import (
    FP8_DTYPE,
    ExpertScales,
    dequantize_experts,
    dequantize_weight_blocks,
    per_token_group_quant_ref,
)
from tokenmill.ops.fp8_quant import per_token_group_quant
from tokenmill.ops.fused_moe_configs import GEMV_MAX_TOKENS, MoeKernelConfig, moe_config
from tokenmill.ops.fused_moe_gemv import fused_experts_gemv
from tokenmill.ops.moe_align import MoeAlignment, moe_align
from tokenmill.ops.pdl import launch_options, pdl_enter


# One compiled kernel for every batch size: the sizes that follow the batch are not specialised on.
@triton.jit(do_not_specialize=["num_entries", "max_padded"])
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    a_scale_ptr, b_scale_ptr, out_ptr, counter_ptr,
    N, K, num_entries, max_padded,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_bse, stride_bsn, stride_om,
    GATE_UP: tl.constexpr, MUL_WEIGHT: tl.constexpr, A_ROWS_PER_ENTRY_DIV: tl.constexpr,
    PRECISION: tl.constexpr, FP8: tl.constexpr, BLOCKWISE: tl.constexpr, SCALE_BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SUM_TOP_K: tl.constexpr = 0, PDL: tl.constexpr = False,
):
    """C[entry, n] = A[entry // A_ROWS_PER_ENTRY_DIV, :] @ B[expert, n, :] for the entries of one
    aligned block. GATE_UP: B holds [gate; up] (2N rows) and C = silu(gate) * up. MUL_WEIGHT: C
    is scaled by the entry's routing weight.

    SUM_TOP_K = k (the down GEMM, every entry local): OUT[token, n] = the sum of C over the token's
    k entries, by the program that stores the last of them in this column tile (an arrival counter
    per token and tile, `counter_ptr` [tokens, cdiv(N, BLOCK_N)], zero before and after), in entry
    order: the same order whichever program finishes last, so deterministic.

    FP8: A and B are e4m3 with float32 scales (`ops/fp8_format.ExpertScales`): BLOCKWISE, A's per
    row and K tile ([rows, cdiv(K, BLOCK_K)]) and B's per block of SCALE_BLOCK_N rows and one K
    tile, applied to each tile's product; else A's per row and B's per output row, applied once
    to the sum."""
    pdl_enter(PDL)  # (the block's expert, and so its weights, come from the kernel before)
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(max_padded, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Row blocks in groups of GROUP_M, column tiles inner: a group's programs share weight tiles in L2.
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    entry = tl.load(sorted_ids_ptr + offs_m, mask=offs_m < max_padded, other=num_entries)
    row_ok = entry < num_entries
    a_row = (entry // A_ROWS_PER_ENTRY_DIV).to(tl.int64)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk
    # (FP8) the scales of A's rows, and of B's gate (or only) and up rows.
    a_scale_ptrs = a_scale_ptr + a_row * stride_asm
    b_scale_ptrs = b_scale_ptr + expert * stride_bse + (offs_n // SCALE_BLOCK_N).to(tl.int64) * stride_bsn
    b_up_scale_ptrs = b_scale_ptr + expert * stride_bse + ((offs_n + N) // SCALE_BLOCK_N).to(tl.int64) * stride_bsn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if FP8 and BLOCKWISE:
            kb = k_start // BLOCK_K
            a_s = tl.load(a_scale_ptrs + kb, mask=row_ok, other=0.0)[:, None]
            acc += tl.dot(a, b) * a_s * tl.load(b_scale_ptrs + kb, mask=n_ok, other=0.0)[None, :]
            if GATE_UP:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc_up += tl.dot(a, b_up) * a_s * tl.load(b_up_scale_ptrs + kb, mask=n_ok, other=0.0)[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            if GATE_UP:
                b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if FP8 and not BLOCKWISE:
        a_s = tl.load(a_scale_ptrs, mask=row_ok, other=0.0)[:, None]
        acc = acc * a_s * tl.load(b_scale_ptrs, mask=n_ok, other=0.0)[None, :]
        if GATE_UP:
            acc_up = acc_up * a_s * tl.load(b_up_scale_ptrs, mask=n_ok, other=0.0)[None, :]
    out_dtype = c_ptr.dtype.element_ty
    if GATE_UP:
        gate = acc.to(out_dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(out_dtype).to(tl.float32)
        out = act * acc_up.to(out_dtype).to(tl.float32)
    else:
        out = acc
    if MUL_WEIGHT:
        weight = tl.load(topk_weights_ptr + entry, mask=row_ok, other=0.0)
        out = out.to(out_dtype).to(tl.float32) * weight[:, None]
    c_ptrs = c_ptr + entry[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, out.to(out_dtype), mask=row_ok[:, None] & n_ok[None, :])
    if SUM_TOP_K:
        _sum_top_k_after_last(c_ptr, out_ptr, counter_ptr, entry, row_ok, offs_n, n_ok, pid_n, num_pid_n,
                              stride_cm, stride_cn, stride_om, SUM_TOP_K)


@triton.jit
def _sum_top_k_after_last(c_ptr, out_ptr, counter_ptr, entry, row_ok, offs_n, n_ok, pid_n, num_pid_n,
                          stride_cm, stride_cn, stride_om, TOP_K: tl.constexpr):
    """The down GEMM's top-k sum: count this block's rows in (one per token: a token's k entries
    have k different experts, so no two rows of a block share a counter) and, for the tokens whose
    last entry this program stored, sum their k rows of C over this column tile into OUT. The
    split-KV merge's protocol (`attention_decode.py`): a barrier orders the block's stores before
    the release at gpu scope; a barrier after the acquire before the other threads read."""
    tl.debug_barrier()
    token = entry // TOP_K
    counters = counter_ptr + token.to(tl.int64) * num_pid_n + pid_n
    arrived = tl.atomic_add(counters, 1, mask=row_ok, sem="acq_rel", scope="gpu")
    last = row_ok & (arrived == TOP_K - 1)
    if tl.max(last.to(tl.int32), 0) > 0:
        tl.atomic_xchg(counters, 0, mask=last, sem="relaxed", scope="gpu")  # ready for the next launch
        tl.debug_barrier()
        mask = last[:, None] & n_ok[None, :]
        first = (token * TOP_K).to(tl.int64)
        total = tl.zeros(mask.shape, dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            total += tl.load(c_ptr + (first + j)[:, None] * stride_cm + offs_n[None, :] * stride_cn, mask=mask,
                             other=0.0, cache_modifier=".cg").to(tl.float32)
        tl.store(out_ptr + token.to(tl.int64)[:, None] * stride_om + offs_n[None, :], total.to(out_ptr.dtype.element_ty),
                 mask=mask)


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights: torch.Tensor,
                  align: MoeAlignment, n: int, k: int, gate_up: bool, rows_div: int,
                  config: MoeKernelConfig, a_scale: torch.Tensor | None = None, b_scale: torch.Tensor | None = None,
                  block: tuple[int, int] | None = None, summed: tuple[torch.Tensor, torch.Tensor, int] | None = None,
                  pdl: bool = False) -> None:
    """`a_scale` / `b_scale` (fp8 `a` and `b`): per-group and per-block scales with `block`,
    per-row and per-output-row scales without. `summed` (the down GEMM): (out [T, n], zeroed
    counters, top_k), `c`'s rows summed per token into `out` in the same launch."""
    max_padded = align.sorted_ids.shape[0]
    grid = (triton.cdiv(max_padded, config.block_m) * triton.cdiv(n, config.block_n),)
    fp8 = a_scale is not None
    block_k = block[1] if fp8 and block is not None else config.block_k
    scales = (a_scale, b_scale, a_scale.stride(0), b_scale.stride(0), b_scale.stride(1)) if fp8 else (c, c, 0, 0, 0)
    out, counters, sum_top_k = summed if summed is not None else (c, c, 0)  # (not read without SUM_TOP_K)
    _grouped_gemm_kernel[grid](
        a, b, c, topk_weights, align.sorted_ids, align.block_expert, align.num_padded, scales[0], scales[1],
        out, counters, n, k, c.shape[0], max_padded,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1), *scales[2:],
        out.stride(0), SUM_TOP_K=sum_top_k, GATE_UP=gate_up, MUL_WEIGHT=not gate_up, A_ROWS_PER_ENTRY_DIV=rows_div,
        PRECISION="ieee" if a.dtype == torch.float32 else None, FP8=fp8, BLOCKWISE=block is not None,
        SCALE_BLOCK_N=block[0] if fp8 and block is not None else 1,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k, GROUP_M=config.group_m, PDL=pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, **launch_options(pdl))


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                  config: MoeKernelConfig | None = None, path: str = "auto",
                  scales: ExpertScales | None = None, pdl: bool = False,
                  sum_counters: torch.Tensor | None = None) -> torch.Tensor:
    """The routed experts' weighted sum for every token.

    Args:
        hidden: [T, H]. w13: [E_local, 2 * I, H] (gate rows, then up rows). w2: [E_local, H, I].
        topk_weights: [T, k] float32. topk_ids: [T, k] int32, global expert ids.
        expert_map: [E] int32 global -> local id, -1 where this rank holds no copy (those entries
            contribute nothing); None: every expert is local.
        config: launch configuration of the grouped GEMMs (default: `fused_moe_configs.moe_config`).
        path: "grouped" (alignment + grouped GEMMs), "gemv" (token by token, `fused_moe_gemv.py`)
            or "auto": "gemv" up to `GEMV_MAX_TOKENS` tokens unless a config is given.
        scales: for e4m3 `w13` / `w2`, their scales (`fp8_format.ExpertScales`). The grouped GEMMs
            then run on the fp8 tensor cores with each GEMM's input quantised per token and group
            of `bk` (per token for channel scales), as the dense fp8 layers (`fp8_gemm.py`); the
            GEMV path multiplies by the dequantised weights (weight-only).
        pdl: the kernels launch dependent (`pdl.py`; the grouped path's fp8 input quantisation
            the ordinary way).
        sum_counters: `new_sum_counters(...)`, not shared with a launch that may run concurrently:
            where it is large enough (and every expert is local) the down GEMM also sums each
            token's k rows, one launch fewer (decode batches); else a separate sum.
    Returns:
        [T, H] in hidden's dtype.
    """
    num_tokens, hidden_size = hidden.shape
    num_local, two_inter, _ = w13.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    assert w2.shape == (num_local, hidden_size, inter) and w13.shape[2] == hidden_size
    assert topk_weights.dtype == torch.float32 and topk_weights.shape == topk_ids.shape
    if num_tokens == 0:
        return torch.zeros_like(hidden)
    assert w13.stride(2) == 1 and w2.stride(2) == 1
    hidden = hidden.contiguous()
    topk_ids = topk_ids.to(torch.int32).contiguous()
    topk_weights = topk_weights.contiguous()
    if path == "auto":
        path = "gemv" if config is None and num_tokens <= GEMV_MAX_TOKENS else "grouped"
    assert (scales is not None) == (w13.dtype == FP8_DTYPE), "fp8 experts come with their scales"
    if path == "gemv":
        return fused_experts_gemv(hidden, w13, w2, topk_weights, topk_ids, expert_map, scales, pdl=pdl)
    assert path == "grouped", path
    if config is None:
        config = moe_config(num_tokens, num_local, top_k, hidden_size, inter, hidden.dtype, hidden.device)
    align = moe_align(topk_ids, config.block_m, num_local, expert_map, pdl=pdl)
    num_entries = num_tokens * top_k
    act = torch.empty(num_entries, inter, dtype=hidden.dtype, device=hidden.device)
    a, fp8 = hidden, {}
    if scales is not None:  # each GEMM's input quantised per token (and group)
        a, a_scale = per_token_group_quant(hidden, scales.block[1] if scales.block else hidden_size, scales.ue8m0)
        fp8 = dict(a_scale=a_scale, b_scale=scales.w13, block=scales.block)
    _grouped_gemm(a, w13, act, topk_weights, align, inter, hidden_size, gate_up=True, rows_div=top_k,
                  config=config, pdl=pdl, **fp8)
    a = act
    if scales is not None:
        a, a_scale = per_token_group_quant(act, scales.block[1] if scales.block else inter, scales.ue8m0)
        fp8 = dict(a_scale=a_scale, b_scale=scales.w2, block=scales.block)
    # Entries of experts on no rank here are never written: zero them so they add nothing.
    alloc = torch.empty if expert_map is None else torch.zeros
    per_entry = alloc(num_entries, hidden_size, dtype=hidden.dtype, device=hidden.device)
    summed = None
    if (sum_counters is not None and expert_map is None
            and num_tokens * triton.cdiv(hidden_size, config.block_n) <= sum_counters.numel()):
        summed = (torch.empty_like(hidden), sum_counters, top_k)
    _grouped_gemm(a, w2, per_entry, topk_weights, align, hidden_size, inter, gate_up=False, rows_div=1,
                  config=config, summed=summed, pdl=pdl, **fp8)
    if summed is not None:
        return summed[0]
    return per_entry.view(num_tokens, top_k, hidden_size).sum(dim=1)


def new_sum_counters(max_tokens: int, hidden_size: int, device: torch.device) -> torch.Tensor:
    """Zeroed arrival counters for `fused_experts(sum_counters=...)`: enough for calls of up to
    `max_tokens` tokens at any column tile of 16 or wider. Each launch leaves them zero again, so
    one serves every later call on the same stream (the layers of a step one after another)."""
    return torch.zeros(max_tokens * triton.cdiv(hidden_size, 16), dtype=torch.int32, device=device)


def fused_experts_fp8_ref(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, scales: ExpertScales,
                          expert_map: torch.Tensor | None = None) -> torch.Tensor:
    """The fp8 grouped path of `fused_experts` in plain torch: the weights dequantised, each GEMM's
    input quantised per token (and group) and dequantised as the kernels quantise it, products in
    float32, rounded where the kernels round (gate, up, SiLU, the product; each entry's output and
    its weighted value, summed over the k in the model dtype)."""
    dtype = hidden.dtype
    num_tokens, hidden_size = hidden.shape
    inter, top_k = w2.shape[2], topk_ids.shape[1]
    bk = scales.block[1] if scales.block else None
    w13_f = dequantize_experts(w13, scales.w13, scales.block, torch.float32)
    w2_f = dequantize_experts(w2, scales.w2, scales.block, torch.float32)

    def quantised(x: torch.Tensor, group: int) -> torch.Tensor:
        x_q, x_s = per_token_group_quant_ref(x, group, scales.ue8m0)
        return dequantize_weight_blocks(x_q, x_s, (1, group), torch.float32)

    a = quantised(hidden, bk or hidden_size)
    per_entry = torch.zeros(num_tokens * top_k, hidden_size, dtype=dtype, device=hidden.device)
    local = topk_ids.long() if expert_map is None else expert_map[topk_ids.long()].long()
    for expert in torch.unique(local[local >= 0]).tolist():
        tokens, slot = torch.where(local == expert)
        gate, up = (a[tokens] @ w13_f[expert].T).chunk(2, dim=-1)
        gate = gate.to(dtype).float()
        act = ((gate * torch.sigmoid(gate)).to(dtype).float() * up.to(dtype).float()).to(dtype)
        y = (quantised(act, bk or inter) @ w2_f[expert].T).to(dtype).float() * topk_weights[tokens, slot, None]
        per_entry[tokens * top_k + slot] = y.to(dtype)
    return per_entry.view(num_tokens, top_k, hidden_size).sum(dim=1)
