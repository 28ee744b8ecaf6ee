"""Expert selection in one kernel: scores, top-k, renormalisation and scaling for each token.

Computes what `model/layers/moe/router.select_experts` (the reference, HF's operations) computes
for the routings without expert groups: softmax scores (Mixtral, Qwen-MoE) or sigmoid scores
with an optional correction bias that only chooses (MiniMax-M2), then renormalisation and the
scaling factor. In torch that is five to seven small kernels a layer (softmax, top-k, sum,
divide, cast...), each a few microseconds, which at batch-1 decode adds up to a good part of a
token's time over 48 layers; here it is one.

One program per token holds its E scores in registers and takes the k largest by k rounds of
argmax (the lowest index among equal scores). One warp does it for up to 512 experts: each round's
reduction is then register shuffles only, where 4 warps meet in shared memory twice a round; the
kernel is pure latency (a few hundred bytes), once a layer at batch-1 decode. Softmax picks the experts by their logits (the same
order as the probabilities) and computes the chosen ones' probabilities from the row's max and
sum. Weights are float32, ids int32. With `pdl` it launches dependent (`pdl.py`) on the router's GEMV.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.pdl import launch_options, pdl_enter


@triton.jit
def _route_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts, stride_row, scaling,
                  TOP_K: tl.constexpr, K_PAD: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr,
                  RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, PDL: tl.constexpr = False):
    pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + row * stride_row + experts, mask=valid, other=float("-inf")).to(tl.float32)
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
