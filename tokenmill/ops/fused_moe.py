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
4. The k rows of each token are summed (`torch.sum` over the entry axis: deterministic, no atomics).

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

from tokenmill.ops.fused_moe_configs import MoeKernelConfig, moe_config
from tokenmill.ops.moe_align import MoeAlignment, moe_align


# One compiled kernel for every batch size: the sizes that follow the batch are not specialised on.
@triton.jit(do_not_specialize=["num_entries", "max_padded"])
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, topk_weights_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
    N, K, num_entries, max_padded,
    stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
    GATE_UP: tl.constexpr, MUL_WEIGHT: tl.constexpr, A_ROWS_PER_ENTRY_DIV: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """C[entry, n] = A[entry // A_ROWS_PER_ENTRY_DIV, :] @ B[expert, n, :] for the entries of one
    aligned block. GATE_UP: B holds [gate; up] (2N rows) and C = silu(gate) * up. MUL_WEIGHT: C
    is scaled by the entry's routing weight."""
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if GATE_UP:
            b_up = tl.load(b_ptrs + N * stride_bn, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc_up = tl.dot(a, b_up, acc_up, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
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


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, topk_weights: torch.Tensor,
                  align: MoeAlignment, n: int, k: int, gate_up: bool, rows_div: int,
                  config: MoeKernelConfig) -> None:
    max_padded = align.sorted_ids.shape[0]
    grid = (triton.cdiv(max_padded, config.block_m) * triton.cdiv(n, config.block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, topk_weights, align.sorted_ids, align.block_expert, align.num_padded,
        n, k, c.shape[0], max_padded,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        GATE_UP=gate_up, MUL_WEIGHT=not gate_up, A_ROWS_PER_ENTRY_DIV=rows_div,
        PRECISION="ieee" if a.dtype == torch.float32 else None,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages)


def fused_experts(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_map: torch.Tensor | None = None,
                  config: MoeKernelConfig | None = None) -> torch.Tensor:
    """The routed experts' weighted sum for every token.

    Args:
        hidden: [T, H]. w13: [E_local, 2 * I, H] (gate rows, then up rows). w2: [E_local, H, I].
        topk_weights: [T, k] float32. topk_ids: [T, k] int32, global expert ids.
        expert_map: [E] int32 global -> local id, -1 where this rank holds no copy (those entries
            contribute nothing); None: every expert is local.
        config: launch configuration (default: `fused_moe_configs.moe_config`).
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
    hidden = hidden.contiguous()
    topk_ids = topk_ids.to(torch.int32).contiguous()
    topk_weights = topk_weights.contiguous()
    if config is None:
        config = moe_config(num_tokens, num_local, top_k, hidden_size, inter, hidden.dtype, hidden.device)
    align = moe_align(topk_ids, config.block_m, num_local, expert_map)
    num_entries = num_tokens * top_k
    act = torch.empty(num_entries, inter, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(hidden, w13, act, topk_weights, align, inter, hidden_size, gate_up=True, rows_div=top_k,
                  config=config)
    # Entries of experts on no rank here are never written: zero them so they add nothing.
    alloc = torch.empty if expert_map is None else torch.zeros
    per_entry = alloc(num_entries, hidden_size, dtype=hidden.dtype, device=hidden.device)
    _grouped_gemm(act, w2, per_entry, topk_weights, align, hidden_size, inter, gate_up=False, rows_div=1,
                  config=config)
    return per_entry.view(num_tokens, top_k, hidden_size).sum(dim=1)
