"""Tensor-parallel-aware linear layers (Megatron style).

Column-parallel layers split the output features across ranks (no communication); row-parallel
layers split the input features and sum their partial outputs over the ranks. QKV and gate/up are
merged into one matrix each, so a decoder layer does two GEMMs where HF does five, and exactly one
sum over ranks per attention block and per MLP block. The matrix product and the parameters it
reads are the layer's `method` (`linear_method.py`; fp8 ones in `quantization/`), chosen when the
layer is built from the device and the model's quantisation.

Each layer says where its shard lies in the checkpoint's tensors: `output_ranges()` (one
`ShardRange` per merged part) and `input_range()`. Its one `weight_loader(param, tensor,
shard_id)` copies that shard of a full HF tensor (`[out, in]`, or `[out]`) into any of the
method's parameters, at the parameter's granularity (a block scale holds one entry per block).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from tokenmill.config.parallel import divide, head_partition
from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear_method import LinearMethod
from tokenmill.model.layers.quantization import linear_method
from tokenmill.ops.cpu_gemm import ACTIVATIONS


class ShardRange(NamedTuple):
    """Rows (or columns) `[src, src + size)` of a checkpoint tensor whose dimension is `src_total`
    long, held at `[dst, dst + size)` of this rank's parameter."""

    dst: int
    src: int
    size: int
    src_total: int

    def in_entries(self, granularity: int) -> "ShardRange":
        """The same range in entries of `granularity` elements (a block scale's rows or columns);
        ranges start on a block (checked when the layer is built) and may end in a partial one."""
        if granularity == 1:
            return self
        assert self.dst % granularity == 0 and self.src % granularity == 0, (self, granularity)
        return ShardRange(self.dst // granularity, self.src // granularity, -(-self.size // granularity),
                          -(-self.src_total // granularity))


class LinearBase(nn.Module):
    """`activation` (an HF name: gelu, gelu_new, gelu_pytorch_tanh, relu) is applied to the output,
    inside the GEMM where the kernel can (oneDNN on the CPU); only for layers whose output is final
    on every rank (replicated or column-parallel)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, activation: str | None = None) -> None:
        super().__init__()
        if activation is not None and activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
        self.activation = activation
        self.tp = build_context().tp
        self.in_features, self.out_features = in_features, out_features  # this rank's
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.use_method(linear_method())

    def use_method(self, method: LinearMethod) -> None:
        """Multiply with `method`, whose parameters replace the current method's (the bias stays)."""
        for name in [n for n in self._parameters if n != "bias"]:
            delattr(self, name)
        self.method = method
        method.create_weights(self, self.in_features, self.out_features)

    # ----- where this rank's shard lies in the checkpoint -----
    shard_ids: tuple = (None,)  # the `shard_id`s of the checkpoint tensors merged here

    def output_range(self, shard_id) -> ShardRange:
        return ShardRange(0, 0, self.out_features, self.out_features)

    def output_ranges(self) -> list[ShardRange]:
        return [self.output_range(shard_id) for shard_id in self.shard_ids]

    def input_range(self) -> ShardRange:
        return ShardRange(0, 0, self.in_features, self.in_features)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} loads shards {self.shard_ids}, not {shard_id!r}")
        name = next(n for n, p in self._parameters.items() if p is param)
        rows_per_entry, cols_per_entry = self.method.param_granularity(name)
        out = self.output_range(shard_id).in_entries(rows_per_entry)
        if loaded.shape[0] != out.src_total:
            raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} does not match the layer "
                             f"({out.src_total} rows expected)")
        src = loaded.narrow(0, out.src, out.size)
        if param.dim() >= 2:  # (a GGUF weight is [out, blocks, block bytes])
            cols = self.input_range().in_entries(cols_per_entry)
            if loaded.shape[1] != cols.src_total:
                raise ValueError(f"{name}: checkpoint shape {tuple(loaded.shape)} does not match the layer "
                                 f"({cols.src_total} columns expected)")
            src = src.narrow(1, cols.src, cols.size)
        param.data.narrow(0, out.dst, out.size).copy_(src)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def drop_derived_weights(self) -> None:
        self.method.drop_derived_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)[0]


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank."""


class ColumnParallelLinear(LinearBase):
    """y = x W^T with W's rows (output features) split across ranks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 activation: str | None = None) -> None:
        tp = build_context().tp
        self.out_per_rank = divide(out_features, tp.world_size, "output features")
        super().__init__(in_features, self.out_per_rank, bias, activation)

    def output_range(self, shard_id) -> ShardRange:
        rows = self.out_per_rank
        return ShardRange(0, self.tp.rank * rows, rows, rows * self.tp.world_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate and up): shard i is loaded from its own tensor."""

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool = False) -> None:
        self.out_sizes = out_sizes
        self.shard_ids = tuple(range(len(out_sizes)))
        world = build_context().tp.world_size
        for size in out_sizes:
            divide(size, world, "output features")
        super().__init__(in_features, sum(out_sizes), bias)

    def output_range(self, shard_id) -> ShardRange:
        world = self.tp.world_size
        size = self.out_sizes[shard_id] // world
        offset = sum(self.out_sizes[:shard_id]) // world
        return ShardRange(offset, self.tp.rank * size, size, self.out_sizes[shard_id])


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix, heads split across ranks (`config/parallel.head_partition`)."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False) -> None:
        tp = build_context().tp
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
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

    def output_range(self, shard_id) -> ShardRange:
        if shard_id == "q":
            return ShardRange(0, self.q_start * self.head_dim, self.q_size, self.total_num_heads * self.head_dim)
        offset = self.q_size + (0 if shard_id == "k" else self.kv_size)
        return ShardRange(offset, self.kv_start * self.head_dim, self.kv_size,
                          self.total_num_kv_heads * self.head_dim)

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
        self.in_total = in_features
        super().__init__(self.in_per_rank, out_features, bias)

    def input_range(self) -> ShardRange:
        return ShardRange(0, self.in_start, self.in_per_rank, self.in_total)

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
