"""Where a checkpoint's per-expert matrices go in a `FusedMoE` layer (`layers/moe/fused_moe.py`).

Checkpoints store each routed expert's three matrices separately; the layer holds them stacked
(`w13_weight [E, 2I, H]`: gate then up; `w2_weight [E, H, I]`). One declared table covers the
names every supported family uses, so no model repeats it (and weight updates reuse it):

| checkpoint name | families | shard |
|---|---|---|
| `....experts.{e}.gate_proj.weight` / `w1` | Qwen-MoE, DeepSeek / Mixtral, MiniMax-M2 | w1 (gate) |
| `....experts.{e}.up_proj.weight` / `w3` | Qwen-MoE, DeepSeek / Mixtral, MiniMax-M2 | w3 (up) |
| `....experts.{e}.down_proj.weight` / `w2` | Qwen-MoE, DeepSeek / Mixtral, MiniMax-M2 | w2 (down) |

Block-FP8 checkpoints add each matrix's `weight_scale_inv` beside its `weight`; they go to the
stacked `w13_weight_scale_inv` / `w2_weight_scale_inv` the same way.

The layer must sit where the checkpoint's `experts` module is (`mlp.experts`,
`block_sparse_moe.experts`).
"""

from __future__ import annotations

import re
from typing import NamedTuple

# HF projection name -> the FusedMoE shard it fills.
EXPERT_SHARDS = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}
_EXPERT_WEIGHT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>"
                            + "|".join(EXPERT_SHARDS) + r")\.(?P<tensor>weight|weight_scale_inv)$")


class ExpertWeight(NamedTuple):
    param_name: str  # the stacked parameter: `<...>.experts.w13_weight`, `...w2_weight` (or their `_scale_inv`)
    shard_id: str  # "w1", "w2" or "w3"
    expert_id: int  # global expert id


def expert_weight(name: str) -> ExpertWeight | None:
    """The stacked parameter, shard and expert of checkpoint tensor `name`; None if it is not one
    routed expert's matrix."""
    match = _EXPERT_WEIGHT.match(name)
    if match is None:
        return None
    shard = EXPERT_SHARDS[match["proj"]]
    stacked = ("w2_" if shard == "w2" else "w13_") + match["tensor"]
    return ExpertWeight(f"{match['layer']}.{stacked}", shard, int(match["expert"]))
