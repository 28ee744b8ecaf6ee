"""The torch references of lightning attention (`lightning_attention.py` has the math and the
Triton kernels): the CPU path of `model/attention/lightning.py` and what the kernels are tested
against. Float32 throughout; the prefill walks the same absolute-aligned blocks as the kernel, so
checkpoints land on the same boundaries.
"""

from __future__ import annotations

import torch

# Tokens per scan block (at most; a power of two dividing the checkpoint interval, at least 16,
# the smallest `tl.dot`). 64 keeps a program's q/k tiles, scores and float32 state tile within
# registers at head_dim 128 with 8 warps.
MAX_SCAN_BLOCK = 64
MIN_SCAN_BLOCK = 16


def scan_block(checkpoint_interval: int) -> int:
    """The largest power of two <= MAX_SCAN_BLOCK dividing `checkpoint_interval` (0: no
    checkpoints), so that every checkpoint boundary ends a block."""
    block = MAX_SCAN_BLOCK
    while checkpoint_interval and checkpoint_interval % block:
        block //= 2
    assert block >= MIN_SCAN_BLOCK, f"checkpoint interval {checkpoint_interval} is not a multiple of {MIN_SCAN_BLOCK}"
    return block


def _block_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor,
                state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of n tokens from `state`: q/k/v [n, H, D] float32, slopes [H], state [H, D, D]
    float32 -> (out [n, H, D], state after the block)."""
    n = q.shape[0]
    idx = torch.arange(n, dtype=torch.float32, device=q.device)
    decay = torch.exp(-slopes[:, None] * idx[None, :])  # [H, n]: lambda^i
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, D]
    inter = torch.matmul(qh * (decay * torch.exp(-slopes)[:, None])[:, :, None], state)  # lambda^(i+1) q_i S
    diff = idx[:, None] - idx[None, :]
    causal = torch.where(diff >= 0, torch.exp(-slopes[:, None, None] * diff.clamp(min=0)),
                         torch.zeros((), device=q.device))  # [H, n, n]
    intra = torch.matmul(torch.matmul(qh, kh.transpose(1, 2)) * causal, vh)
    key_decay = torch.exp(-slopes[:, None] * (n - 1 - idx)[None, :])  # [H, n]: lambda^(n-1-j)
    state = state * torch.exp(-slopes * n)[:, None, None] + torch.matmul(
        (kh * key_decay[:, :, None]).transpose(1, 2), vh)
    return (inter + intra).transpose(0, 1), state


def lightning_prefill_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slopes: torch.Tensor,  # [num_heads] float32
    state_pool: torch.Tensor,  # [num_slots, num_heads, head_dim, head_dim] float32
    query_start_loc: list[int], seq_lens: list[int], state_slots: list[int],
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim], rows of requests first_req.. written
    first_req: int,
    checkpoints: list[list[int]] | None = None,  # per request: slot per boundary (-1: none)
    checkpoint_interval: int = 0,
) -> None:
    """The prefill of requests `first_req:` (host lists), block by block, float32 throughout."""
    slopes = slopes.float()
    block = scan_block(checkpoint_interval)
    for i in range(first_req, len(seq_lens)):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        context = seq_lens[i] - (end - start)
        slot = state_slots[i]
        state = state_pool[slot].float() if slot >= 0 and context > 0 else \
            torch.zeros(state_pool.shape[1:], dtype=torch.float32, device=q.device)
        pos = context
        while pos < seq_lens[i]:
            block_end = min((pos // block + 1) * block, seq_lens[i])
            rows = slice(start + pos - context, start + block_end - context)
            o, state = _block_scan(q[rows].float(), k[rows].float(), v[rows].float(), slopes, state)
            out[rows] = o.to(out.dtype)
            if checkpoint_interval and block_end % checkpoint_interval == 0 and checkpoints:
                j = block_end // checkpoint_interval - context // checkpoint_interval - 1
                if j < len(checkpoints[i]) and checkpoints[i][j] >= 0:
                    state_pool[checkpoints[i][j]] = state
            pos = block_end
        if slot >= 0:
            state_pool[slot] = state


def lightning_decode_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    slopes: torch.Tensor, state_pool: torch.Tensor,
    seq_lens: torch.Tensor,  # [num_decodes]: context after the step (1: a one-token prompt)
    state_slots: torch.Tensor,  # [num_decodes] int32
    out: torch.Tensor,
) -> None:
    """One token per request: S = lambda S + k^T v, o = q S, all requests at once."""
    slots = state_slots.long()
    live = slots >= 0
    rows = slots.clamp(min=0)
    has_state = (live & (seq_lens > 1))[:, None, None, None]
    state = torch.where(has_state, state_pool[rows], torch.zeros((), device=q.device))
    kv = k.float()[:, :, :, None] * v.float()[:, :, None, :]  # [B, H, D, D]
    state = state * torch.exp(-slopes.float())[None, :, None, None] + kv
    out.copy_(torch.matmul(q.float()[:, :, None, :], state)[:, :, 0].to(out.dtype))
    out[~live] = 0
    state_pool[rows[live]] = state[live]
