"""`FusedMoE`: a mixture-of-experts feed-forward layer: routing, the routed experts' gated MLPs,
the top-k weighted sum, optional shared experts, and one tensor-parallel sum for all of it.

Weights are stacked per expert: `w13_weight [E_local, 2 * I_local, H]` (gate rows, then up rows)
and `w2_weight [E_local, H, I_local]` (with their scales for fp8 experts: the layer's `method`,
`layers/quantization/moe_method.py` / `fp8_moe.py`), loaded one HF tensor at a time through
`weight_loader(param, tensor, shard_id, expert_id)` with `shard_id` "w1" (gate), "w3" (up) or
"w2" (down) (`model/loader/expert_weights.py` maps the checkpoint names). Under tensor
parallelism every rank holds every expert's slice of the intermediate dimension (`I_local = I /
tp`), so each rank's output is a partial sum. `expert_map` ([E] int32: global expert id -> local
slot, -1 where this rank holds no copy) is what expert parallelism will change: a rank computes
only the (token, expert) pairs of its local experts and the sum over ranks adds the rest.

Implementation, chosen once when built (`CustomOp`):
- `forward_native` (CPU, and the reference every kernel is tested against): `select_experts`,
  then a loop over the experts that received tokens, each a gathered GEMM pair, scattered back
  with `index_add_`.
- `forward_cuda`: routing in one kernel (`ops/moe_routing.py`; grouped routings through
  `select_experts`), which at batch-1 decode also computes the router's product when the layer
  holds its router (`router=`: one launch a layer for what was a GEMV and a routing kernel),
  then the fused Triton kernels of `ops/fused_moe.py` (tokens aligned by expert in blocks,
  grouped GEMMs with SiLU-and-mul and the routing weight fused, at decode sizes the top-k sum in
  the down GEMM; a few tokens go token by token,
  `ops/fused_moe_gemv.py`). No host sync: CUDA-graph capturable. At decode the
  routing and expert kernels launch dependent where the GPU supports it (`ops/pdl.py`).
Experts no token chose cost nothing in either.

Shared experts (DeepSeek's `shared_experts`, Qwen2-MoE's sigmoid-gated `shared_expert`) are
modules the model registers where its checkpoint names them and hands to this layer: built with
`reduce_results=False`, their partial outputs join the routed experts' before the single sum over
ranks, which `TensorParallelGroup.defer_sum` hands to the next RMSNorm. So the output of `forward`
must go straight into that norm (as every MoE decoder's does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.config.parallel import divide
from tokenmill.model.build_context import build_context
from tokenmill.model.custom_op import CustomOp
from tokenmill.model.forward_context import current_forward_context
from tokenmill.model.layers.linear_method import CudaLinearMethod
from tokenmill.model.layers.moe.router import RoutingConfig, select_experts
from tokenmill.model.layers.quantization import moe_method
from tokenmill.model.layers.quantization.moe_method import MoeMethod

SHARD_IDS = ("w1", "w2", "w3")  # gate, down, up (Mixtral's names; `loader/expert_weights.py`)
# Up to this many tokens the grouped path sums each token's experts inside its down GEMM.
SUM_IN_GEMM_MAX_TOKENS = 256
# Up to this many tokens (decode graphs) the router's product, its norm and the routing are one kernel.
FUSED_ROUTER_MAX_TOKENS = 16


class FusedMoE(CustomOp):
    """Args:
        num_experts: routed experts of the model (global count, E).
        hidden_size: H. intermediate_size: each expert's I (whole, before the tensor-parallel split).
        routing: how tokens pick experts (`router.RoutingConfig`).
        shared_experts: optional `GatedMLP(..., reduce_results=False)`, registered by the caller.
        shared_expert_gate: optional [H -> 1] linear: the shared output is scaled by
            `sigmoid(shared_expert_gate(x))` (Qwen2-MoE), registered by the caller.
        hidden_act: the experts' activation (silu only).
        local_experts: the global ids this rank holds (None: all of them).
        router: optional [H -> E] router, registered by the caller: a `ReplicatedLinear`, or a
            module with a bare `weight` (DeepSeek's float32 gate). `forward` without router logits
            runs it, and at batch-1 decode on CUDA runs its product and the routing as one kernel
            (`moe_routing.route_from_hidden`).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, routing: RoutingConfig,
                 shared_experts: nn.Module | None = None, shared_expert_gate: nn.Module | None = None,
                 hidden_act: str = "silu", local_experts: Sequence[int] | None = None,
                 router: nn.Module | None = None) -> None:
        super().__init__()
        if hidden_act != "silu":
            raise ValueError(f"expert activation {hidden_act!r} is not supported (silu)")
        if shared_expert_gate is not None and shared_experts is None:
            raise ValueError("a shared_expert_gate needs shared_experts")
        routing.check_num_experts(num_experts)
        context = build_context()
        self.tp = context.tp
        self.routing = routing
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_per_rank = divide(intermediate_size, self.tp.world_size, "expert intermediate size")
        local = list(range(num_experts)) if local_experts is None else sorted(local_experts)
        if len(set(local)) != len(local) or not all(0 <= e < num_experts for e in local):
            raise ValueError(f"local_experts must be distinct ids in 0..{num_experts - 1}")
        self.num_local_experts = len(local)
        self.all_experts_local = len(local) == num_experts
        expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
        expert_map[local] = torch.arange(len(local), dtype=torch.int32)
        self._expert_map_host = expert_map.tolist()
        self.register_buffer("expert_map", expert_map.to(context.device), persistent=False)
        # The stacked expert weights (w13_weight, w2_weight and, for fp8 experts, their scales).
        self.use_method(moe_method())
        # Held, not registered: the model registers them under their checkpoint names.
        self._shared = (shared_experts, shared_expert_gate)
        self._router = router
        self._router_counter: torch.Tensor | None = None  # route_from_hidden's, allocated on first use
        self._sum_counters: torch.Tensor | None = None  # the down GEMM's top-k sum's, likewise
        self._loaded: set[tuple[int, str, str]] = set()  # (expert, shard, parameter) loaded from a checkpoint
        if self.uses_cuda_kernels:
            from tokenmill.ops import fused_moe, moe_routing
            self._fused_experts = fused_moe.fused_experts
            self._route = moe_routing.route  # the routings without expert groups, in one kernel
            self._route_from_hidden = moe_routing.route_from_hidden  # and with the router's product
            self._rms_norm_route = moe_routing.rms_norm_route_from_hidden  # and the norm before it
            self._pdl = context.pdl  # the decode chain's kernels launch dependent (ops/pdl.py)
        self._fuse_router = self.uses_cuda_kernels and router is not None and context.kernels.triton_gemv

    # ----- weights -----
    def use_method(self, method: MoeMethod) -> None:
        """Hold the experts as `method` stores them (replacing the current method's parameters)."""
        for name in list(self._parameters):
            delattr(self, name)
        self.method = method
        method.create_weights(self, self.num_local_experts, self.hidden_size, self.intermediate_per_rank)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        """Copy this rank's slice of one expert's HF matrix (`[I, H]` for w1/w3, `[H, I]` for w2),
        or of its scales (one entry per block of it: the method's `param_granularity`)."""
        if shard_id not in SHARD_IDS:
            raise ValueError(f"expert shard id {shard_id!r} is not one of {SHARD_IDS}")
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"expert id {expert_id} out of range: the layer has {self.num_experts} experts")
        name = next(n for n, p in self._parameters.items() if p is param)
        assert name.startswith("w2_") == (shard_id == "w2"), "w1/w3 load into w13_*, w2 into w2_*"
        local = self._expert_map_host[expert_id]
        if local < 0:
            return
        rows_per, cols_per = self.method.param_granularity(name)  # elements per entry (1, or a block)
        inter, rank = self.intermediate_per_rank, self.tp.rank
        full_inter = inter * self.tp.world_size
        hidden = self.hidden_size
        if shard_id == "w2":
            expected = (-(-hidden // rows_per), -(-full_inter // cols_per))
        else:
            expected = (-(-full_inter // rows_per), -(-hidden // cols_per))
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expert {expert_id} {shard_id} ({name}): checkpoint shape {tuple(loaded.shape)}, "
                             f"expected {expected}")
        # This rank's slice starts on a block (`quantization/fp8_moe.py` checks when built).
        if shard_id == "w2":
            param.data[local].copy_(loaded.narrow(1, rank * inter // cols_per, -(-inter // cols_per)))
        else:
            rows = inter // rows_per
            offset = 0 if shard_id == "w1" else rows
            param.data[local].narrow(0, offset, rows).copy_(loaded.narrow(0, rank * rows, rows))
        self._loaded.add((expert_id, shard_id, name))

    def unloaded_weights(self) -> list[str]:
        """After a checkpoint load: the (expert, shard, parameter) matrices this rank holds that
        were never loaded (`load_weights` refuses a checkpoint with any). Clears the record."""
        params = list(self._parameters)
        wanted = {(e, s, n) for e, slot in enumerate(self._expert_map_host) if slot >= 0 for s in SHARD_IDS
                  for n in params if n.startswith("w2_") == (s == "w2")}
        missing = [f"expert {e} {s}" + ("" if n.endswith("_weight") else f" {n}")
                   for e, s, n in sorted(wanted - self._loaded)]
        self._loaded.clear()
        return missing

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    # ----- forward -----
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor | None = None,
                correction_bias: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [T, H], router_logits [T, E] (None: the layer's `router` computes them;
        correction_bias [E] where the routing has one) -> [T, H]: the routed experts' weighted sum
        plus the shared experts' output, summed over tensor-parallel ranks (deferred to the next
        RMSNorm)."""
        if router_logits is None and self._router is None:
            raise ValueError("router_logits are needed: this FusedMoE was built without its router")
        return self._add_shared(hidden, self._impl(self, hidden, router_logits, correction_bias))

    def forward_after_norm(self, norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None,
                           correction_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm block's second half: `(forward(norm(hidden + residual)), hidden + residual)`
        for `norm` an RMSNorm; without `residual` (a first layer) `hidden` is the residual returned.
        Where the router's product runs in the routing kernel (`_router_fuses`), the norm does too
        (`moe_routing.rms_norm_route_from_hidden`, bit-identical), and the experts read the
        normalised row it stores: one launch a layer fewer at batch-1 decode."""
        if self._norm_fuses(norm, hidden):
            topk_weights, topk_ids, normed, residual = self._rms_norm_route(
                hidden, residual, norm.weight, norm.eps, self._router.weight, *self._route_args(correction_bias),
                self._counter(hidden.device), pdl=self._pdl)
            return self._add_shared(normed, self._experts(normed, topk_weights, topk_ids)), residual
        if residual is None:
            return self(norm(hidden), correction_bias=correction_bias), hidden
        normed, residual = norm(hidden, residual)
        return self(normed, correction_bias=correction_bias), residual

    def _add_shared(self, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The routed experts' `out` plus the shared experts' output on `hidden`, summed over ranks."""
        shared_experts, shared_gate = self._shared
        if shared_experts is not None:
            shared = shared_experts(hidden)
            if shared_gate is not None:
                shared = torch.sigmoid(shared_gate(hidden)) * shared
            out = out + shared
        return out if self.tp.world_size == 1 else self.tp.defer_sum(out)

    def forward_native(self, hidden: torch.Tensor, router_logits: torch.Tensor,
                       correction_bias: torch.Tensor | None) -> torch.Tensor:
        """The routed experts only: [T, H], this rank's (partial) weighted sum."""
        if router_logits is None:
            router_logits = self._router(hidden)
        topk_weights, topk_ids = select_experts(router_logits, self.routing, correction_bias)
        w13, w2 = self.method.reference_weights(self, hidden.dtype)
        return experts_ref(hidden, w13, w2, topk_weights, topk_ids, self.expert_map)

    def forward_cuda(self, hidden: torch.Tensor, router_logits: torch.Tensor,
                     correction_bias: torch.Tensor | None) -> torch.Tensor:
        routing = self.routing
        if routing.grouped:
            if router_logits is None:
                router_logits = self._router(hidden)
            topk_weights, topk_ids = select_experts(router_logits, routing, correction_bias)
        else:
            args = self._route_args(correction_bias)
            if router_logits is None and self._router_fuses(hidden):
                topk_weights, topk_ids, _ = self._route_from_hidden(hidden, self._router.weight, *args,
                                                                    self._counter(hidden.device), pdl=self._pdl)
            else:
                if router_logits is None:
                    router_logits = self._router(hidden)
                topk_weights, topk_ids = self._route(router_logits, *args, pdl=self._pdl)
        return self._experts(hidden, topk_weights, topk_ids)

    def _route_args(self, correction_bias: torch.Tensor | None) -> tuple:
        """The routing kernels' arguments after the logits (a routing without expert groups)."""
        routing = self.routing
        if routing.correction_bias != (correction_bias is not None):
            raise ValueError("correction_bias must be given exactly when RoutingConfig.correction_bias is set")
        return (routing.top_k, routing.scoring == "sigmoid", routing.renormalize, routing.routed_scaling_factor,
                correction_bias)

    def _experts(self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum on CUDA (this rank's part)."""
        expert_map = None if self.all_experts_local else self.expert_map
        w13, w2, scales = self.method.kernel_weights(self, hidden.dtype)
        return self._fused_experts(hidden, w13, w2, topk_weights, topk_ids, expert_map, scales=scales, pdl=self._pdl,
                                   sum_counters=self._summing_counters(hidden))

    def _router_fuses(self, hidden: torch.Tensor) -> bool:
        """Whether the router's product runs inside the routing kernel: in a decode graph of up to
        `FUSED_ROUTER_MAX_TOKENS` tokens, for a plain router weight of the hidden state's dtype
        where the Triton GEMV is on, or for a router that is a bare weight (DeepSeek's float32
        gate)."""
        router = self._router
        if not (self._fuse_router and hidden.dim() == 2 and hidden.shape[0] <= FUSED_ROUTER_MAX_TOKENS
                and current_forward_context().decode_graph):
            return False
        method = getattr(router, "method", None)
        if method is None:
            return True
        return (isinstance(method, CudaLinearMethod) and router.bias is None and router.activation is None
                and method.triton_gemv and hidden.dtype == router.weight.dtype)

    def _norm_fuses(self, norm: nn.Module, hidden: torch.Tensor) -> bool:
        """Whether `forward_after_norm` runs `norm` inside the fused router: where the router
        fuses (a routing without expert groups), with the norm's CUDA kernel, in one process
        (under tensor parallelism `hidden` may be a partial sum that only the norm's own kernel
        completes)."""
        return (norm.uses_cuda_kernels and self.tp.world_size == 1 and not self.routing.grouped
                and self._router_fuses(hidden))

    def _counter(self, device: torch.device) -> torch.Tensor:
        # Allocated by the warm-up pass before a decode graph is captured, so no graph allocates it.
        if self._router_counter is None:
            from tokenmill.ops.moe_routing import new_router_counter
            self._router_counter = new_router_counter(device, FUSED_ROUTER_MAX_TOKENS)
        return self._router_counter

    def _summing_counters(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The grouped path's top-k sum runs inside its down GEMM for decode-sized batches (one
        launch a layer fewer); larger steps sum separately, where that launch is a small share."""
        if hidden.shape[0] > SUM_IN_GEMM_MAX_TOKENS or not self.all_experts_local:
            return None
        if self._sum_counters is None:  # (the warm-up pass before graph capture allocates it)
            from tokenmill.ops.fused_moe import new_sum_counters
            self._sum_counters = new_sum_counters(SUM_IN_GEMM_MAX_TOKENS, self.hidden_size, hidden.device)
        return self._sum_counters


def experts_ref(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                topk_ids: torch.Tensor, expert_map: torch.Tensor) -> torch.Tensor:
    """The routed experts in plain torch (the CPU path and the reference of `ops/fused_moe.py`),
    computed as HF's experts modules compute them: per expert that received tokens, ascending.

    hidden [T, H], w13 [E_local, 2I, H], w2 [E_local, H, I], topk_weights [T, k] float32,
    topk_ids [T, k] global ids, expert_map [E] (global -> local, -1 absent) -> [T, H], this
    rank's (partial) weighted sum.
    """
    out = torch.zeros_like(hidden)
    local_ids = expert_map[topk_ids.long()]
    for expert in torch.unique(local_ids[local_ids >= 0]).tolist():
        tokens, slot = torch.where(local_ids == expert)
        gate, up = F.linear(hidden[tokens], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert]) * topk_weights[tokens, slot, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out
