"""The attention-backend interface and the per-step metadata every backend reads.

A step's tokens are flattened into one batch (no padding): request i owns tokens
`query_start_loc[i]:query_start_loc[i+1]`. The model runner orders requests so that decodes
(one new token) come first: `num_decodes` requests with `num_decode_tokens == num_decodes` tokens,
then prefills / prefill chunks. Each request's K/V live in fixed-size blocks of the paged cache,
listed in its row of `block_table`; token t of request i sits at slot
`block_table[i, t // block_size] * block_size + t % block_size`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Per-step inputs of attention, built once per step by the model runner.

    Shapes: `query_start_loc` [num_reqs + 1] int32, `seq_lens` [num_reqs] int32 (tokens in context
    after this step, cached prefix included), `block_table` [num_reqs, max_blocks] int32,
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
    # sit in the same KV blocks (row 0's), and each decode has at least one token past them. A
    # backend may attend that shared prefix once for all of them (cascade attention); 0 or None:
    # nothing shared. Set by the model runner only where the backend can use it.
    common_prefix_len: torch.Tensor | None = None

    @property
    def num_prefills(self) -> int:
        return self.num_reqs - self.num_decodes

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


# (k_cache, v_cache), each [num_blocks, block_size, num_kv_heads, head_dim], in the model dtype or
# float8_e4m3fn (`kv_cache_dtype="fp8"`, format in kv_quant.py). The cache's dtype alone says which.
KVCache = tuple[torch.Tensor, torch.Tensor]


class AttentionBackend(ABC):
    """Writes the step's K/V into the paged cache and computes attention for the step's queries.

    `k_scale` / `v_scale` are the per-layer fp8 scales (stored = x / scale), used only when the
    cache is fp8. They are constants of the attention layer, passed by it on every call, rather
    than state of the backend (one instance serves all layers) or extra members of the KVCache
    tuple (which the runner and CUDA graphs pass around as plain tensors). As Python floats fixed
    for the engine's life they are safe to bake into captured graphs.

    `rope`, when given, is the step's rotary embedding as `RotaryEmbedding.cos_sin` returns it
    (`(positions, cos_sin_cache)` on CUDA, `(cos, sin)` on the CPU): the backend rotates q and k
    (neox style, exactly as `apply_rotary` does) before it writes k to the cache and attends, so
    that a backend can fuse the rotation into its cache write. q and k may be rotated in place
    (on CUDA they are, as `apply_rotary` does there).
    """

    name: str = "abstract"

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        kv_cache: KVCache,
        meta: AttentionMetadata,
        scale: float,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...


_BACKENDS: dict[str, type[AttentionBackend]] = {}


def register_backend(cls: type[AttentionBackend]) -> type[AttentionBackend]:
    _BACKENDS[cls.name] = cls
    return cls


def get_backend(name: str) -> AttentionBackend:
    """`torch_native` or `triton` (imported lazily so CPU installs never need Triton)."""
    if name == "triton" and name not in _BACKENDS:
        import tokenmill.model.attention.triton_backend  # noqa: F401  (registers itself)
    if name == "torch_native" and name not in _BACKENDS:
        import tokenmill.model.attention.torch_native  # noqa: F401
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from torch_native, triton")
    return _BACKENDS[name]()


def default_backend_name(device: torch.device) -> str:
    return "triton" if device.type == "cuda" else "torch_native"
