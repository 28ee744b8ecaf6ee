"""Expert selection: from router logits to each token's top-k experts and their weights.

One function covers every routing form the supported mixture-of-experts models use, each computed
with the same operations, in the same order and precision, as HF transformers, so the chosen
experts are identical (ties included) and the weights equal in float32:

| model | scoring | correction bias | groups (`n_group`, `topk_group`) | renormalize | scaling |
|---|---|---|---|---|---|
| Mixtral | softmax | - | - | yes | 1 |
| Qwen2-MoE, Qwen3-MoE | softmax | - | - | `norm_topk_prob` | 1 |
| DeepSeek-V2 `group_limited_greedy` | softmax | - | group score = its max | no | `routed_scaling_factor` |
| DeepSeek-V3, Kimi-K2 `noaux_tc` | sigmoid | `e_score_correction_bias` | score = sum of top 2 | `norm_topk_prob` | ditto |
| MiniMax-M2 | sigmoid | `e_score_correction_bias` | - | yes | 1 |

With a correction bias, the bias only *chooses* the experts (scores + bias); the weights are the
unbiased scores of the chosen ones. A group's score is the sum of its two best biased scores when
there is a correction bias (DeepSeek-V3), else its best score (DeepSeek-V2), as in HF and vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCORINGS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class RoutingConfig:
    """How a layer picks `top_k` of its experts for each token.

    `num_expert_groups` / `topk_groups`: grouped top-k (experts split into `num_expert_groups`
    equal groups; only experts of the `topk_groups` best groups can be chosen); None for none.
    `correction_bias`: the layer has an `e_score_correction_bias` [num_experts] added to the
    scores for the choice only. `routed_scaling_factor` multiplies the final weights.
    """

    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    num_expert_groups: int | None = None
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"expert scoring function {self.scoring!r} is not supported ({', '.join(SCORINGS)})")
        if self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if (self.num_expert_groups is None) != (self.topk_groups is None):
            raise ValueError("grouped top-k needs both num_expert_groups (n_group) and topk_groups (topk_group)")
        if self.num_expert_groups is not None and not 1 <= self.topk_groups <= self.num_expert_groups:
            raise ValueError(f"topk_group ({self.topk_groups}) must be in 1..n_group ({self.num_expert_groups})")

    @property
    def grouped(self) -> bool:
        return self.num_expert_groups is not None and self.num_expert_groups > 1

    def check_num_experts(self, num_experts: int) -> None:
        """Refuse a routing that cannot pick `top_k` distinct experts out of `num_experts`."""
        if self.top_k > num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) exceeds the number of experts ({num_experts})")
        if self.grouped:
            if num_experts % self.num_expert_groups:
                raise ValueError(f"{num_experts} experts do not split into n_group={self.num_expert_groups} groups")
            if self.top_k > self.topk_groups * (num_experts // self.num_expert_groups):
                raise ValueError(f"num_experts_per_tok ({self.top_k}) exceeds the experts of the "
                                 f"topk_group={self.topk_groups} groups a token may use")


def select_experts(router_logits: torch.Tensor, config: RoutingConfig,
                   correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's experts and weights.

    Args:
        router_logits: [T, E], the gate's output (any float dtype; scored in float32).
        config: the layer's routing.
        correction_bias: [E] float, required iff `config.correction_bias`.
    Returns:
        topk_weights [T, k] float32 and topk_ids [T, k] int32 (global expert ids).
    """
    if config.correction_bias != (correction_bias is not None):
        raise ValueError("correction_bias must be given exactly when RoutingConfig.correction_bias is set")
    if config.scoring == "softmax":
        scores = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    else:
        scores = router_logits.float().sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if config.grouped:
        choice = _mask_to_best_groups(choice, config, by_top2=correction_bias is not None)
    if correction_bias is None and not config.grouped:
        weights, ids = torch.topk(scores, config.top_k, dim=-1)
    else:
        ids = torch.topk(choice, config.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
    if config.renormalize:
        # DeepSeek-V3's guard against an all-zero sum; a no-op for any other float32 sum.
        denominator = weights.sum(dim=-1, keepdim=True)
        weights = weights / (denominator + 1e-20 if config.scoring == "sigmoid" else denominator)
    if config.routed_scaling_factor != 1.0:
        weights = weights * config.routed_scaling_factor
    return weights, ids.to(torch.int32)


def _mask_to_best_groups(choice: torch.Tensor, config: RoutingConfig, by_top2: bool) -> torch.Tensor:
    """`choice` [T, E] with every expert outside the token's `topk_groups` best groups at -inf."""
    num_tokens, num_experts = choice.shape
    groups = choice.view(num_tokens, config.num_expert_groups, num_experts // config.num_expert_groups)
    group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1) if by_top2 else groups.max(dim=-1).values
    best = torch.topk(group_scores, config.topk_groups, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    keep = keep.unsqueeze(-1).expand_as(groups).reshape(num_tokens, num_experts)
    return choice.masked_fill(~keep, float("-inf"))
