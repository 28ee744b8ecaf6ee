"""The attention-backend interface: per-step metadata, the builder that makes it, and the backend
implementation every attention layer calls.

A step's tokens are flattened into one batch (no padding): request i owns tokens
`query_start_loc[i]:query_start_loc[i+1]`. The model runner orders requests so that decodes
(one new token) come first: `num_decodes` requests with one token each, then prefills / prefill
chunks. Each request's K/V live in fixed-size blocks of the paged cache, listed in its row of
`block_table`; token t of request i sits at slot
`block_table[i, t // block_size] * block_size + t % block_size`.

Each backend brings an `AttentionMetadataBuilder`: the runner hands it the step's batch (device
views of its persistent input buffers, plus host copies) and gets the `AttentionMetadata` the
backend reads. Backend-specific decisions live there, not in the runner: whether a decode batch
runs as cascade attention (`common_prefix_len`), and what a CUDA-graph capture needs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from tokenmill.config.engine_config import EngineConfig
    from tokenmill.model.layers.layernorm import RMSNorm
    from tokenmill.model.layers.rotary_embedding import RotaryInputs


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step inputs of attention.

    Shapes: `query_start_loc` [num_reqs + 1] int32, `seq_lens` [num_reqs] int32 (tokens in context
    after this step, cached prefix included), `block_table` [num_reqs, >= max_blocks] int32,
    `slot_mapping` [num_tokens] int64 (where each new token's K/V are written; -1 = skip, used for
    padding tokens in CUDA graphs).
    """

    num_reqs: int
    num_tokens: int
    num_decodes: int  # requests with exactly one new token; they come first
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor
    causal: bool = True
    # Host copies, so CPU-side loops over requests never sync with the device.
    query_start_loc_cpu: torch.Tensor | None = None
    seq_lens_cpu: torch.Tensor | None = None
    # [1] int32 on the device, or None: the first this-many context tokens of every decode request
    # sit in the same KV blocks (row 0's), and each decode has at least one token past them. The
    # backend attends that shared prefix once for all of them (cascade attention). Decided by the
    # backend's builder.
    common_prefix_len: torch.Tensor | None = None
    # Hybrid models (linear-attention layers keep a recurrent state per request in a slot of their
    # state pool, model/attention/lightning.py). [num_reqs] int32: each request's slot (-1: none,
    # e.g. CUDA-graph padding); None for models without state.
    state_slots: torch.Tensor | None = None
    # [2, n] int64 or None: before the step, copy state slot [0, i] into slot [1, i] (a prefix-cache
    # hit restores a request's state from a checkpoint).
    state_restores: torch.Tensor | None = None
    # [num_reqs, max_boundaries] int32 or None: the slot to store each request's state into at the
    # j-th multiple of `state_checkpoint_interval` after its chunk's first token (-1: none).
    state_checkpoints: torch.Tensor | None = None
    state_checkpoint_interval: int = 0

    @property
    def num_prefills(self) -> int:
        return self.num_reqs - self.num_decodes


@dataclass(slots=True)
class StepBatch:
    """What the runner knows about a step's batch, for the builder: the metadata's device tensors
    (views of the runner's persistent buffers, possibly padded for a CUDA graph) and host copies."""

    meta: AttentionMetadata  # common_prefix_len not yet decided
    block_table_host: np.ndarray  # [num_reqs, >= blocks] int32, this step's rows
    seq_lens_host: np.ndarray  # [num_reqs] int32


# (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim], in the model dtype or
# float8_e4m3fn (`kv_cache_dtype="fp8"`, format in ops/kv_quant.py). The cache's dtype alone says which.
KVCache = tuple[torch.Tensor, torch.Tensor]


class AttentionMetadataBuilder(ABC):
    """Makes a backend's `AttentionMetadata` for a step and for CUDA-graph capture."""

    # Decode-only steps can be captured and replayed as CUDA graphs.
    supports_decode_graphs: bool = False

    def __init__(self, config: "EngineConfig", device: torch.device) -> None:
        self.config = config
        self.device = device

    def common_prefix_len(self, block_table: np.ndarray, seq_lens: np.ndarray) -> int:
        """Tokens the step's decode requests (`block_table` / `seq_lens`: their host rows) attend
        once for all of them (cascade attention); 0: attend each request's context alone."""
        return 0

    @abstractmethod
    def build(self, batch: StepBatch, common_prefix_len: int = 0) -> AttentionMetadata:
        """This step's metadata (`common_prefix_len` from `common_prefix_len()` on the same batch)."""

    def build_for_capture(self, batch: StepBatch, cascade: bool, max_model_len: int) -> AttentionMetadata:
        """Metadata for capturing a decode graph over `batch`'s buffers: kernel launch sizes follow
        `max_model_len` (the longest context a replay can have), not the buffers' current values."""
        raise NotImplementedError(f"{type(self).__name__} does not support CUDA graphs")


class AttentionBackend(ABC):
    """Writes the step's K/V into the paged cache and computes attention for the step's queries.

    One instance per attention layer (`model/attention/layer.py` builds it). `k_scale` / `v_scale`
    are the layer's fp8 scales (stored = x / scale), used only when the cache is fp8: constants of
    the layer, fixed for the engine's life, so safe to bake into captured graphs.

    `rope`, when given, is the step's rotary embedding (`RotaryInputs`): the backend rotates q and k
    (neox style) before it writes k to the cache and attends, so that it can fuse the rotation into
    its cache write. q and k may be rotated in place.

    `sliding_window` (a layer constant, None for full attention): the query at position p attends
    the keys at positions (p - sliding_window, p] only. The KV blocks wholly before that range may
    already have been freed and handed to other requests (core/kv_cache_manager.py), so a backend
    must not read them, not even to mask them out.
    """

    name: str = "abstract"
    uses_kv_cache: bool = True  # False: attention within the step only (encoders)
    supports_sliding_window: bool = True  # False: a windowed layer is refused when it is built

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        assert sliding_window is None or sliding_window >= 1
        if sliding_window is not None and not self.supports_sliding_window:
            raise ValueError(f"the {self.name} attention backend has no sliding-window attention; this "
                             "model's windowed layers need torch_native (CPU, without --cpu-compile) or triton")
        self.sliding_window = sliding_window

    @staticmethod
    @abstractmethod
    def builder_class() -> type[AttentionMetadataBuilder]:
        ...

    def fuse_qk_norm(self, q_norm: "RMSNorm", k_norm: "RMSNorm") -> bool:
        """Offered once, when the layer is built, the layer's RMSNorms over each head of q and of k
        (Qwen3's): True if `forward` takes q and k un-normalised and applies them itself, inside its
        own kernels, with exactly the results of `q_norm(q)` and `k_norm(k)`. The default declines:
        the `Attention` layer then applies them before it calls `forward`."""
        return False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        rope: "RotaryInputs | None" = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...
