"""The vocab-parallel embedding table and LM head: rows split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.model.build_context import build_context
from tokenmill.model.layers.linear_method import unquantized_linear_method


class VocabParallelEmbedding(nn.Module):
    """Embedding table with rows split across ranks; out-of-shard ids contribute zeros to the sum."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = build_context().tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // self.tp.world_size)
        self.start = self.tp.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size), requires_grad=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rows = min(self.rows_per_rank, loaded.shape[0] - self.start)
        param.data.zero_()
        param.data[:rows].copy_(loaded[self.start:self.start + rows])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
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
        self.method = unquantized_linear_method(in_compiled_graph=False)
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
