"""The vocab-parallel embedding table and LM head: rows split across tensor-parallel ranks.

With a GGUF file kept quantised and the int8-activation kernel (`KernelConfig.gguf_embedding_type`,
one CPU rank), the table stays in its blocks too: loaded as the file's rows, packed once into the
kernel's layout (`ops/cpu_quant_matmul.py`); lookups dequantise the rows they take and the LM head
multiplies the packed table. A tied head shares the packed table (held once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear_method import LinearMethod, unquantized_linear_method
from tokenmill.ops import cpu_quant_matmul, gguf_blocks


class VocabParallelEmbedding(nn.Module):
    """Embedding table with rows split across ranks; out-of-shard ids contribute zeros to the sum."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = build_context().tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp.world_size)
        self.start = self.tp.rank * self.rows_per_rank
        self.quantized = quantized_table_type(build_context().kernels)  # the GGUF block type, or None
        self.dtype = torch.get_default_dtype()  # the model's: what a quantised lookup returns
        if self.quantized is not None:
            shape = (self.rows_per_rank, hidden_size // gguf_blocks.BLOCK, gguf_blocks.BLOCK_BYTES[self.quantized])
            self.weight = nn.Parameter(torch.empty(shape, dtype=torch.uint8), requires_grad=False)
        else:
            self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = min(self.rows_per_rank, loaded.shape[0] - self.start)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.start:self.start + rows])

    def process_weights_after_loading(self) -> None:
        if self.quantized is not None:
            packed_table(self.weight, self.quantized)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:  # (one rank: GGUF kept quantised runs unsharded)
            return cpu_quant_matmul.gather_rows(self.weight.gguf_packed, input_ids, self.dtype)
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        in_shard = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local.clamp(0, self.rows_per_rank - 1), self.weight)
        return self.tp.all_reduce(out * in_shard.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection, vocab rows split across ranks; logits gathered to full width.

    `tied_to`: the embedding whose table this head reuses (`tie_word_embeddings`): the very same
    Parameter, so it is loaded once and listed once by `named_parameters()`."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__(vocab_size, hidden_size)
        if tied_to is not None:
            self.weight = tied_to.weight
        self.method = (QuantizedHeadMethod(self.quantized) if self.quantized is not None
                       else unquantized_linear_method(in_compiled_graph=False))
        self.activation = None  # (read by the linear method)

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def drop_derived_weights(self) -> None:
        self.method.drop_derived_weights(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise TypeError("an LM head computes logits (compute_logits), it does not embed")

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, hidden] -> [n, vocab] float32 logits."""
        logits, _ = self.method.apply(self, hidden)
        return self.tp.all_gather_last_dim(logits)[..., : self.vocab_size].float()


def quantized_table_type(kernels) -> str | None:
    """The GGUF block type the embedding table (and LM head) stays in: the file's, where the config
    asks for it and the int8-activation kernel runs here; None: dequantised at load. The loader
    asks the same question (`model/registry.build_model`), so both agree."""
    kind = kernels.gguf_embedding_type
    return kind if kind is not None and cpu_quant_matmul.available() else None


def packed_table(weight: nn.Parameter, kind: str) -> cpu_quant_matmul.PackedBlocks:
    """The table's packed form, made once from its GGUF rows: the Parameter keeps its identity (a
    tied head holds the same one) and takes the packed bytes as its data, the scales ride on it."""
    if weight.data.shape[-1] == gguf_blocks.BLOCK_BYTES[kind]:  # still the file's rows (the kernel's are 256 / 512)
        packed = cpu_quant_matmul.pack(weight.data.flatten(1), kind)
        weight.data = packed.qs
        weight.gguf_packed = packed
    return weight.gguf_packed


class QuantizedHeadMethod(LinearMethod):
    """The LM head over a GGUF table kept quantised (`ops/cpu_quant_matmul.py`, int8 activations)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed_table(layer.weight, self.kind)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias=None, push=None):
        return cpu_quant_matmul.matmul(x.reshape(-1, x.shape[-1]), layer.weight.gguf_packed), False
