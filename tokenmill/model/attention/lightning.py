"""`LightningAttention`: MiniMax's linear attention over a per-request recurrent state, the
counterpart of `Attention` for a hybrid model's linear layers.

Per head, `S = lambda S + k^T v` and `o = q S` (`ops/lightning_attention.py`); the whole history of
a request is its state, a float32 `[head_dim, head_dim]` matrix per head. The layer's cache is a
pool of such states, `[num_slots, num_heads, head_dim, head_dim]`: a running request owns one slot
(`meta.state_slots`, handed out by `core/state_cache.py`), other slots hold prefix-cache
checkpoints. So memory per request is constant in its length, and a decode step costs the same at
64k tokens as at 1k.

Each step the layer first copies any restored states (`meta.state_restores`: a prefix-cache hit
starts a request from a checkpoint), then runs the decodes (one recurrent update each) and the
prefill chunks (a block scan continuing the slot's state, storing the checkpoints the scheduler
asked for, `meta.state_checkpoints`). Triton kernels on CUDA, the torch references elsewhere,
chosen when the layer is built.
"""

from __future__ import annotations

import torch

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.cache_layer import CacheLayer
from tokenmill.model.build_context import build_context
from tokenmill.ops import lightning_attention_ref as ref


class LightningAttention(CacheLayer):
    def __init__(self, num_heads: int, head_dim: int, slopes: torch.Tensor) -> None:
        """`num_heads`: this rank's; `slopes` [num_heads]: their decay rates (lambda = exp(-slope))."""
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        assert slopes.shape == (num_heads,)
        self.register_buffer("slopes", slopes.float(), persistent=False)
        self._on_cuda = build_context().on_cuda
        if self._on_cuda:
            from tokenmill.ops import lightning_attention
            self._kernels = lightning_attention

    def state_bytes_per_slot(self) -> int:
        return self.num_heads * self.head_dim * self.head_dim * 4

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                          num_state_slots: int = 0) -> torch.Tensor:
        """The state pool, [num_state_slots, num_heads, head_dim, head_dim] float32."""
        return torch.zeros(num_state_slots, self.num_heads, self.head_dim, self.head_dim,
                           dtype=torch.float32, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state_pool: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q, k, v [T, heads, head_dim] -> [T, heads * head_dim]; updates the requests' slots."""
        if meta.state_restores is not None:
            src, dst = meta.state_restores
            state_pool.index_copy_(0, dst, state_pool.index_select(0, src))
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = meta.num_decodes
        if self._on_cuda:
            self._forward_triton(q, k, v, state_pool, meta, out, nd)
        else:
            self._forward_reference(q, k, v, state_pool, meta, out, nd)
        return out.view(out.shape[0], -1)

    def _forward_triton(self, q, k, v, state_pool, meta: AttentionMetadata, out, nd: int) -> None:
        if nd:
            self._kernels.lightning_decode(q[:nd], k[:nd], v[:nd], self.slopes, state_pool, meta.seq_lens,
                                 meta.state_slots, out[:nd])
        if meta.num_prefills:
            self._kernels.lightning_prefill(q, k, v, self.slopes, state_pool, meta.query_start_loc, meta.seq_lens,
                                  meta.state_slots, out, nd, meta.num_prefills, meta.state_checkpoints,
                                  meta.state_checkpoint_interval)

    def _forward_reference(self, q, k, v, state_pool, meta: AttentionMetadata, out, nd: int) -> None:
        seq_lens = meta.seq_lens_cpu if meta.seq_lens_cpu is not None else meta.seq_lens.cpu()
        slots = meta.state_slots.cpu()
        if nd:
            ref.lightning_decode_ref(q[:nd], k[:nd], v[:nd], self.slopes, state_pool, seq_lens[:nd],
                                     slots[:nd], out[:nd])
        if meta.num_prefills:
            starts = meta.query_start_loc_cpu if meta.query_start_loc_cpu is not None else meta.query_start_loc.cpu()
            checkpoints = None if meta.state_checkpoints is None else meta.state_checkpoints.tolist()
            ref.lightning_prefill_ref(q, k, v, self.slopes, state_pool, starts.tolist(), seq_lens.tolist(),
                                      slots.tolist(), out, nd, checkpoints, meta.state_checkpoint_interval)
