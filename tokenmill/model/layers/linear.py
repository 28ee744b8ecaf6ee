"""Tensor-parallel-aware linear layers (Megatron style).

Column-parallel layers split the output features across ranks (no communication); row-parallel
layers split the input features and all-reduce their partial sums. QKV and gate/up are merged
into one matrix each, so a decoder layer does two GEMMs where HF does five, and exactly one
all-reduce per attention block and per MLP block. Each layer's `weight_loader(param, tensor)`
takes a full checkpoint tensor (HF layout `[out, in]`) and copies in this rank's shard.
"""

from __future__ import annotations

import torch
from torch import nn

from tokenmill.distributed.parallel_state import tp_all_reduce, tp_rank, tp_world_size
from tokenmill.model.layers import cpu_gemm
from tokenmill.model.layers.matmul import linear, linear_silu_mul


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor_parallel_size ({parts})")
    return total // parts


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match parameter {tuple(param.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # CPU: oneDNN layout, set after loading

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _default_loader(param, loaded)

    def pack_for_cpu(self) -> None:
        """Re-lay the loaded weight out for oneDNN (CPU only; see cpu_gemm.py)."""
        self.packed_weight = cpu_gemm.pack_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed_weight, self.bias)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.out_per_rank = _divide(out_features, tp_world_size(), "output features")
        super().__init__(in_features, self.out_per_rank, bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        rows = self.out_per_rank
        _default_loader(param, loaded.narrow(0, tp_rank() * rows, rows))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate and up): shard i is loaded from its own tensor."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes), bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        assert shard_id is not None, "merged layers load one shard at a time"
        size = self.out_sizes[shard_id] // tp_world_size()
        offset = sum(self.out_sizes[:shard_id]) // tp_world_size()
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, tp_rank() * size, size))


def head_partition(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[int, int, int, int]:
    """This rank's attention heads: `(q_start, q_count, kv_start, kv_count)`.

    KV heads are spread as evenly as they go, each taking its whole group of query heads, so a
    model whose KV heads do not divide by the rank count still splits (SmolLM2-135M's 3 KV heads
    over 2 ranks: 2 + 1, with 6 + 3 query heads). With fewer KV heads than ranks, each KV head is
    replicated on `tp // num_kv_heads` ranks and the query heads split evenly.
    """
    if num_heads % num_kv_heads:
        raise ValueError(f"attention heads ({num_heads}) must be a multiple of KV heads ({num_kv_heads})")
    if num_kv_heads >= tp:
        base, extra = divmod(num_kv_heads, tp)
        kv_count = base + (rank < extra)
        kv_start = rank * base + min(rank, extra)
        group = num_heads // num_kv_heads
        return kv_start * group, kv_count * group, kv_start, kv_count
    if tp % num_kv_heads:
        raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of the KV heads ({num_kv_heads}) "
                         "when there are fewer KV heads than ranks")
    q_count = _divide(num_heads, tp, "attention heads")
    return rank * q_count, q_count, rank // (tp // num_kv_heads), 1


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix, heads split across ranks (see `head_partition`)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        self.head_dim = head_dim
        self.q_start, self.num_heads, self.kv_start, self.num_kv_heads = head_partition(
            num_heads, num_kv_heads, tp_world_size(), tp_rank())
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


class RowParallelLinear(LinearBase):
    """y = x W^T with W's columns (input features) split across ranks, partial sums all-reduced.

    `input_slice=(start, size)` gives this rank's columns explicitly (attention's output projection
    follows the rank's query heads, which may be uneven); by default they split evenly.
    `reduce_results=False` returns this rank's partial sums (the bias, if any, in rank 0's) for the
    caller to reduce, e.g. fused with the next norm (`RMSNorm.reduce_add`).
    `forward_silu_mul(gate_up)` is `forward(silu_and_mul(gate_up))`, the activation fused into the
    batch-1 decode GEMV. `push_slot` (with `reduce_results=False`): the fused all-reduce slot that
    will sum the output; the batch-1 GEMV then sends its row to the peers as it finishes.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 input_slice: tuple[int, int] | None = None, reduce_results: bool = True,
                 push_slot: int | None = None) -> None:
        if input_slice is None:
            size = _divide(in_features, tp_world_size(), "input features")
            input_slice = (tp_rank() * size, size)
        self.in_start, self.in_per_rank = input_slice
        self.reduce_results = reduce_results
        self.push_slot = None if reduce_results else push_slot
        super().__init__(self.in_per_rank, out_features, bias)

    def weight_loader(self, param, loaded, shard_id=None) -> None:
        if param.dim() == 1:  # the bias is added once, after the reduce
            _default_loader(param, loaded)
            return
        _default_loader(param, loaded.narrow(1, self.in_start, self.in_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bias_and_reduce(linear(x, self.weight, self.packed_weight, push_slot=self._push_slot()))

    def forward_silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """`self(silu(gate) * up)` for `gate_up` = [gate | up], this rank's shard of each as a
        `MergedColumnParallelLinear` of the same rank count outputs them. Lets batch-1 decode fold
        the activation into the GEMV (`matmul.linear_silu_mul`) instead of running it apart."""
        return self._bias_and_reduce(linear_silu_mul(gate_up, self.weight, self.packed_weight,
                                                     push_slot=self._push_slot()))

    def _push_slot(self) -> int | None:
        # Rank 0 adds the bias after the product, so its rows are not final: none is pushed then.
        return self.push_slot if self.bias is None else None

    def _bias_and_reduce(self, y: torch.Tensor) -> torch.Tensor:
        if not self.reduce_results:
            return y if self.bias is None or tp_rank() != 0 else y + self.bias
        y = tp_all_reduce(y)
        return y if self.bias is None else y + self.bias
