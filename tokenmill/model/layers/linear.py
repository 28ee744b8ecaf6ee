"""Tensor-parallel-aware linear layers (Megatron style).

Column-parallel layers split the output features across ranks (no communication); row-parallel
layers split the input features and sum their partial outputs over the ranks. QKV and gate/up are
merged into one matrix each, so a decoder layer does two GEMMs where HF does five, and exactly one
sum over ranks per attention block and per MLP block. Each layer's `weight_loader(param, tensor)`
takes a full checkpoint tensor (HF layout `[out, in]`) and copies in this rank's shard. The matrix
product itself is the layer's `method` (`linear_method.py`), chosen when the layer is built.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.config.parallel import divide, head_partition
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear_method import unquantized_linear_method


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.tp = build_context().tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.method = unquantized_linear_method()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _default_loader(param, loaded)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)[0]


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank."""


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = build_context().tp
        self.out_per_rank = divide(out_features, tp.world_size, "output features")
        super().__init__(in_features, self.out_per_rank, bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        rows = self.out_per_rank
        _default_loader(param, loaded.narrow(0, self.tp.rank * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate and up): shard i is loaded from its own tensor."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        assert shard_id is not None, "merged layers load one shard at a time"
        world = self.tp.world_size
        size = self.out_sizes[shard_id] // world
        offset = sum(self.out_sizes[:shard_id]) // world
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix, heads split across ranks (`config/parallel.head_partition`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp = build_context().tp
        self.head_dim = head_dim
        self.q_start, self.num_heads, self.kv_start, self.num_kv_heads = head_partition(
            num_heads, num_kv_heads, tp.world_size, tp.rank)
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, local_out, bias)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        assert shard_id in ("q", "k", "v")
        if shard_id == "q":
            offset, size, start = 0, self.q_size, self.q_start * self.head_dim
        else:
            offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
            size, start = self.kv_size, self.kv_start * self.head_dim
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, local_out] -> q [T, heads, head_dim], k and v [T, kv_heads, head_dim] (views)."""
        q_size, kv_size = self.q_size, self.kv_size
        q = qkv[:, :q_size].view(-1, self.num_heads, self.head_dim)
        k = qkv[:, q_size:q_size + kv_size].view(-1, self.num_kv_heads, self.head_dim)
        v = qkv[:, q_size + kv_size:].view(-1, self.num_kv_heads, self.head_dim)
        return q, k, v


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (input features) split across ranks; the output is the sum of
    every rank's partial product.

    `input_slice=(start, size)` gives this rank's columns explicitly (attention's output projection
    follows the rank's query heads, which may be uneven); by default they split evenly. The sum over
    ranks may be deferred to the RMSNorm that follows (`TensorParallelGroup.defer_sum`), which then
    computes it fused with the residual add and the norm; the caller sees the summed output either
    way, as long as it hands it straight to that norm. The bias, if any, is added once (rank 0).

    `reduce_results=False` returns this rank's partial product unsummed, for a caller that adds it
    to other partial sums and has the total summed once (a mixture-of-experts layer's shared
    expert, `layers/moe/fused_moe.py`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 input_slice: tuple[int, int] | None = None, reduce_results: bool = True) -> None:
        tp = build_context().tp
        self.reduce_results = reduce_results
        if input_slice is None:
            size = divide(in_features, tp.world_size, "input features")
            input_slice = (tp.rank * size, size)
        self.in_start, self.in_per_rank = input_slice
        super().__init__(self.in_per_rank, out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is added once, by rank 0
            _default_loader(param, loaded)
            return
        _default_loader(param, loaded.narrow(1, self.in_start, self.in_per_rank))

    def _bias(self) -> torch.Tensor | None:
        return self.bias if self.tp.rank == 0 else None

    def _push_target(self, x: torch.Tensor):
        if self.tp.world_size == 1 or not self.reduce_results:
            return None
        return self.tp.push_target(x.shape[0], self.weight.shape[0], x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, pushed = self.method.apply(self, x, self._bias(), self._push_target(x))
        return self._sum(y, pushed)

    def forward_silu_mul(self, gate_up: torch.Tensor, silu_and_mul: nn.Module) -> torch.Tensor:
        """`self(silu_and_mul(gate_up))` for `gate_up` = [gate | up], this rank's shard of each as a
        `MergedColumnParallelLinear` of the same rank count outputs them; lets batch-1 decode fold
        the activation into the GEMV (`linear_method.py`)."""
        y, pushed = self.method.apply_silu_mul(self, gate_up, silu_and_mul, self._bias(), self._push_target(gate_up))
        return self._sum(y, pushed)

    def _sum(self, y: torch.Tensor, pushed: bool) -> torch.Tensor:
        if self.tp.world_size == 1 or not self.reduce_results:
            return y
        return self.tp.defer_sum(y, pushed)
