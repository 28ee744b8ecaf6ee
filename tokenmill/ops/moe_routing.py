"""Expert selection in one kernel: scores, top-k, renormalisation and scaling for each token.

Computes what `model/layers/moe/router.select_experts` (the reference, HF's operations) computes
for the routings without expert groups: softmax scores (Mixtral, Qwen-MoE) or sigmoid scores
with an optional correction bias that only chooses (MiniMax-M2), then renormalisation and the
scaling factor. In torch that is five to seven small kernels a layer (softmax, top-k, sum,
divide, cast...), each a few microseconds, which at batch-1 decode adds up to a good part of a
token's time over 48 layers; here it is one.

One program per token holds its E scores in registers and takes the k largest by k rounds of
argmax (the lowest index among equal scores; the round's maximum is the chosen score, so a round is
one reduction). One warp does it for up to 512 experts: its reductions are register shuffles only,
where 4 warps would meet in shared memory; the kernel is pure latency (a few hundred bytes), once a
layer at batch-1 decode. Softmax picks the experts by their logits (the same order as the
probabilities) and computes the chosen ones' probabilities from the row's max and sum. Weights are
float32, ids int32. With `pdl` it launches dependent (`pdl.py`) on the router's GEMV.

`route_from_hidden` is the decode form (a few tokens): the router's GEMV and the routing in one
launch. The router matrix is small (E x H: 0.5 MB for Qwen3-30B-A3B), so at decode its GEMV and
the routing are each a launch of pure latency; here the GEMV's programs (two experts' rows of one
token each, reading their first tile while the kernel before finishes) write the logits, and the
program that finishes a token's last routes it, as the split-KV decode kernel merges
(`attention_decode.py`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops import l2_prefetch
from tokenmill.ops.fused_moe_configs import RouterConfig, router_config
from tokenmill.ops.gemv import NormArgs, row_block_sums
from tokenmill.ops.l2_prefetch import prefetch_to_l2
from tokenmill.ops.pdl import launch_options, pdl_enter


@triton.jit
def _select_top_k(logits, experts, valid, bias_ptr, weights_ptr, ids_ptr, row, scaling,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORMALIZE: tl.constexpr):
    """The routing of one token from its float32 logits [BLOCK_E] (-inf where not `valid`):
    writes row `row` of the weights and ids."""
    if SIGMOID:
        scores = tl.sigmoid(logits)
        choice = scores
        if HAS_BIAS:
            choice = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0).to(tl.float32)
        choice = tl.where(valid, choice, float("-inf"))
    else:
        row_max = tl.max(logits, 0)
        exp = tl.where(valid, tl.exp(logits - row_max), 0.0)
        denominator = tl.sum(exp, 0)
        scores = exp / denominator
        choice = logits
    slots = tl.arange(0, K_PAD)
    chosen_ids = tl.zeros((K_PAD,), dtype=tl.int32)
    chosen = tl.zeros((K_PAD,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best_choice, best = tl.max(choice, 0, return_indices=True, return_indices_tie_break_left=True)
        hit = experts == best
        if SIGMOID and HAS_BIAS:  # the choice is score + bias: read the score itself
            weight = tl.sum(tl.where(hit, scores, 0.0), 0)
        elif SIGMOID:
            weight = best_choice
        else:  # the same operations as `scores` on the same logit: the same bits
            weight = tl.exp(best_choice - row_max) / denominator
        chosen_ids = tl.where(slots == k, best, chosen_ids)
        chosen = tl.where(slots == k, weight, chosen)
        choice = tl.where(hit, float("-inf"), choice)
    if RENORMALIZE:
        total = tl.sum(chosen, 0)
        if SIGMOID:
            total += 1e-20  # DeepSeek-V3's guard, as the reference adds it
        chosen = chosen / total
    chosen = chosen * scaling
    out = row * TOP_K + slots
    tl.store(weights_ptr + out, chosen, mask=slots < TOP_K)
    tl.store(ids_ptr + out, chosen_ids, mask=slots < TOP_K)


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts, stride_row, scaling,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + row * stride_row + experts, mask=valid, other=float("-inf")).to(tl.float32)
    _select_top_k(logits, experts, valid, bias_ptr, weights_ptr, ids_ptr, row, scaling,
                  TOP_K, K_PAD, SIGMOID, HAS_BIAS, RENORMALIZE)


@triton.jit
def _router_route_kernel(x_ptr, w_ptr, logits_ptr, counter_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts,
                         hidden, stride_wn, scaling, prefetch_ptr, prefetch_bytes,
                         residual_ptr, norm_w_ptr, residual_out_ptr, normed_out_ptr, eps,  # NORM only (NormArgs)
                         TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                         RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                         WRITE_NORMED: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr = False,
                         PREFETCH: tl.constexpr = False, THREADS: tl.constexpr = 32):
    # The router's GEMV, BLOCK_N experts' logits of one token (axis 1) a program, with `gemv.py`'s
    # K loop (and its RMSNorm of the token's row, the norm's outputs stored by program 0).
    pid = tl.program_id(0)
    token = tl.program_id(1)
    row_offset = token.to(tl.int64) * hidden
    if PREFETCH:  # weights used after the experts' stream: evict-last (l2_prefetch.py)
        if token == 0:
            prefetch_to_l2(prefetch_ptr, prefetch_bytes, pid, tl.num_programs(0), THREADS, True)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < num_experts
    products = row_block_sums(x_ptr + row_offset, w_ptr, rows, row_mask, hidden, stride_wn, pid,
                              residual_ptr + row_offset, norm_w_ptr, residual_out_ptr + row_offset,
                              normed_out_ptr + row_offset, eps,
                              False, BLOCK_K, PDL, NORM, HAS_RESIDUAL, WRITE_NORMED, BLOCK_H)
    logits_ptr += token.to(tl.int64) * num_experts
    tl.store(logits_ptr + rows, products.to(logits_ptr.dtype.element_ty), mask=row_mask)
    # The program that finishes the token's logits last routes it, from every program's logits
    # (attention_decode.py's split merge: a barrier orders the block's stores before one thread's
    # release at gpu scope).
    tl.debug_barrier()
    counter_ptr += token
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")  # ready for the next launch
        tl.debug_barrier()
        experts = tl.arange(0, BLOCK_E)
        valid = experts < num_experts
        logits = tl.load(logits_ptr + experts, mask=valid, other=float("-inf"), cache_modifier=".cg")
        _select_top_k(logits.to(tl.float32), experts, valid, bias_ptr, weights_ptr, ids_ptr, token.to(tl.int64),
                      scaling, TOP_K, K_PAD, SIGMOID, HAS_BIAS, RENORMALIZE)


def route(router_logits: torch.Tensor, top_k: int, sigmoid: bool, renormalize: bool, scaling: float = 1.0,
          correction_bias: torch.Tensor | None = None, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] (last dim contiguous) -> (topk_weights [T, k] float32, topk_ids [T, k] int32).
    `correction_bias` [E] (sigmoid scoring only) chooses without weighing."""
    assert router_logits.stride(-1) == 1 and top_k <= router_logits.shape[1]
    assert correction_bias is None or sigmoid
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=router_logits.device)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        bias = correction_bias if correction_bias is not None else weights  # not read without HAS_BIAS
        _route_kernel[(num_tokens,)](
            router_logits, bias, weights, ids, num_experts, router_logits.stride(0), float(scaling),
            TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), SIGMOID=sigmoid, HAS_BIAS=correction_bias is not None,
            RENORMALIZE=renormalize, BLOCK_E=block_e, PDL=pdl, num_warps=1 if block_e <= 512 else 4,
            **launch_options(pdl))
    return weights, ids


def new_router_counter(device: torch.device, max_tokens: int = 1) -> torch.Tensor:
    """The zeroed arrival counters `route_from_hidden` needs for up to `max_tokens` tokens (one a
    token); each launch leaves them zero again, so they serve every later launch on the same stream."""
    return torch.zeros(max_tokens, dtype=torch.int32, device=device)


def route_from_hidden(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, sigmoid: bool, renormalize: bool,
                      scaling: float, correction_bias: torch.Tensor | None, counter: torch.Tensor,
                      pdl: bool = False, norm: NormArgs | None = None, config: RouterConfig | None = None,
                      prefetch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few tokens' routing from their hidden states, the router's product included, in one
    launch: hidden [T, H], gate_weight [E, H] (the router linear's weight, H contiguous) ->
    (topk_weights [T, k] float32, topk_ids [T, k] int32, router_logits [T, E]), the same as
    `route(gemv(hidden[t], gate_weight), ...)` computes row by row. The logits have the product's
    dtype as torch types it (a float32 gate, DeepSeek's, multiplies the hidden state in float32:
    float32 logits).

    At decode the router's GEMV reads only E x H weights (0.5 MB for Qwen3-30B-A3B) and the routing
    a few hundred bytes a token: both are latency, a launch each, once a layer. Here the GEMV's
    programs (BLOCK_N experts of one token each) write their logits and the last one of a token
    to finish routes it. `counter`: `new_router_counter(device, >= T)`, not shared with a launch
    that may run concurrently.

    With `norm` (`rms_norm_route_from_hidden`) `hidden` is the norm's input: the kernel routes its
    RMSNorm and stores the norm's outputs where `norm` says. `config`: the launch configuration
    (default: `fused_moe_configs.router_config`, measured where the sweep has run). `prefetch`:
    weights read after the experts (the next layer's first GEMV), asked of L2 with the evict-last
    priority as the kernel starts, while it waits on the kernel before (`l2_prefetch.py`)."""
    num_experts, hidden_size = gate_weight.shape
    num_tokens = hidden.shape[0]
    assert hidden.shape == (num_tokens, hidden_size) and hidden.is_contiguous() and gate_weight.stride(1) == 1
    assert top_k <= num_experts and (correction_bias is None or sigmoid) and counter.numel() >= num_tokens
    device = hidden.device
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    logits = torch.empty(num_tokens, num_experts, dtype=torch.promote_types(hidden.dtype, gate_weight.dtype),
                         device=device)
    bias = correction_bias if correction_bias is not None else weights  # not read without HAS_BIAS
    norm = norm if norm is not None else NormArgs.off(hidden)
    if config is None:
        config = router_config(num_experts, hidden_size, gate_weight.dtype, norm.on, device)
    _router_route_kernel[(triton.cdiv(num_experts, config.block_n), num_tokens)](
        hidden, gate_weight, logits, counter, bias, weights, ids, num_experts, hidden_size, gate_weight.stride(0),
        float(scaling), prefetch if prefetch is not None else logits,
        l2_prefetch.check_range(prefetch) if prefetch is not None else 0, *norm.kernel_args(),
        TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), SIGMOID=sigmoid,
        HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize, BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, **norm.meta(hidden_size), PDL=pdl,
        PREFETCH=prefetch is not None, THREADS=32 * config.num_warps,
        num_warps=config.num_warps, **launch_options(pdl))
    return weights, ids, logits


def rms_norm_route_from_hidden(
        hidden: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
        gate_weight: torch.Tensor, top_k: int, sigmoid: bool, renormalize: bool, scaling: float,
        correction_bias: torch.Tensor | None, counter: torch.Tensor, pdl: bool = False,
        config: RouterConfig | None = None, prefetch: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A pre-norm MoE layer's post-attention norm and its routing in one launch: with
    `normed, new_residual = rms_norm(hidden, norm_weight, eps, residual)` (bit for bit; without
    `residual` the new residual is `hidden` itself), returns (topk_weights, topk_ids, normed,
    new_residual), the routing that of `route_from_hidden(normed, ...)`. Every program normalises
    the row for its own products (`gemv.NormArgs`); the first stores `normed`, which the experts read."""
    assert hidden.is_contiguous() and norm_weight.shape == (hidden.shape[1],)
    normed = torch.empty_like(hidden)
    if residual is None:
        norm = NormArgs(norm_weight, hidden, hidden, normed, eps, has_residual=False, write_normed=True)
    else:
        assert residual.shape == hidden.shape and residual.is_contiguous()
        norm = NormArgs(norm_weight, residual, torch.empty_like(hidden), normed, eps, has_residual=True,
                        write_normed=True)
    weights, ids, _ = route_from_hidden(hidden, gate_weight, top_k, sigmoid, renormalize, scaling, correction_bias,
                                        counter, pdl, norm, config, prefetch)
    return weights, ids, normed, norm.residual_out if residual is not None else hidden
