"""Lightning attention (MiniMax's linear attention): prefill as a block scan, decode as a recurrent
update, as Triton kernels (their torch references: `lightning_attention_ref.py`).

Per head h with decay rate s_h (lambda = exp(-s_h)), over a request's tokens t = 0, 1, ...:

    S_t = lambda * S_{t-1} + k_t^T v_t        (S: [head_dim, head_dim], S_{-1} = 0)
    o_t = q_t S_t

The state S after a request's computed tokens lives in a float32 slot of the layer's state pool
(`[num_slots, num_heads, head_dim, head_dim]`); every step continues it, so chunked prefill and
decode compose. A request whose step starts at position 0 (context 0) starts from zero and never
reads its slot (it may hold a previous owner's state); slot -1 (CUDA-graph padding, the profile
run) reads zero and writes nothing.

Prefill cuts the chunk into blocks aligned to absolute multiples of BLOCK tokens (the first may
start mid-block, at the chunk's first token), and per block of n tokens from state S:

    o_i = lambda^(i+1) q_i S + sum_{j<=i} lambda^(i-j) (q_i . k_j) v_j
    S'  = lambda^n S + sum_j lambda^(n-1-j) k_j^T v_j

which is the recurrence, exactly, in matrix products. Because blocks end on absolute multiples of
BLOCK, the state at every multiple of `checkpoint_interval` (a multiple of BLOCK) passes through
the scan, and the kernel stores it into the slot `checkpoints[request, j]` names for the j-th such
boundary after the chunk's first token (-1: not wanted): prefix caching's state checkpoints.

Shapes: q, k, v `[num_tokens, num_heads, head_dim]` (any token/head strides, last dim contiguous),
requests laid out as in attention metadata (`query_start_loc`, `seq_lens` = context after the step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenmill.ops.attention_common import LOG2E, model_dot
from tokenmill.ops.lightning_attention_ref import scan_block

_LOG2E = tl.constexpr(LOG2E)  # (a jit function reads only constexpr globals)
# Value columns of the state per program: [head_dim, BLOCK_DV] float32.
BLOCK_DV = 64

# Per-step values are not specialised on (a new variant would compile mid-serving; see attention_decode.py).
@triton.jit(do_not_specialize=["first_req", "ckpt_interval", "ckpt_stride"])
def _lightning_prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slopes_ptr, state_ptr, query_start_loc_ptr, seq_lens_ptr,
    state_slots_ptr, ckpt_ptr, first_req, ckpt_interval, ckpt_stride,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_s_slot, stride_s_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK: tl.constexpr,
    CHECKPOINTS: tl.constexpr,
):
    req = first_req + tl.program_id(0)
    head = tl.program_id(1)
    dv0 = tl.program_id(2) * BLOCK_DV
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len
    slot = tl.load(state_slots_ptr + req).to(tl.int64)
    neg_slope_log2 = -tl.load(slopes_ptr + head) * _LOG2E  # lambda^x = exp2(neg_slope_log2 * x)

    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    vdims = dv0 + tl.arange(0, BLOCK_DV)
    vdim_mask = vdims < HEAD_DIM
    s_offs = head * stride_s_head + dims[:, None] * HEAD_DIM + vdims[None, :]
    s_mask = dim_mask[:, None] & vdim_mask[None, :]
    state = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    if (slot >= 0) & (context > 0):
        state = tl.load(state_ptr + slot * stride_s_slot + s_offs, mask=s_mask, other=0.0)

    idx = tl.arange(0, BLOCK)
    diff = (idx[:, None] - idx[None, :]).to(tl.float32)
    causal = idx[:, None] >= idx[None, :]
    # Block b covers absolute positions [max(b * BLOCK, context), min((b + 1) * BLOCK, seq_len)).
    for b in range(context // BLOCK, tl.cdiv(seq_len, BLOCK)):
        begin = tl.maximum(b * BLOCK, context)
        end = tl.minimum((b + 1) * BLOCK, seq_len)
        n = end - begin
        rows = (q_start + begin - context + idx).to(tl.int64)
        row_mask = idx < n
        # Tensor-core products take the model dtype (float32 state and accumulators): the state,
        # a sum over the whole history, is rounded only as an operand, never as it accumulates.
        q = tl.load(q_ptr + rows[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        k = tl.load(k_ptr + rows[:, None] * stride_k_tok + head * stride_k_head + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_v_tok + head * stride_v_head + vdims[None, :],
                    mask=row_mask[:, None] & vdim_mask[None, :], other=0.0)
        dtype = q.dtype
        fidx = idx.to(tl.float32)
        q_decay = tl.exp2(neg_slope_log2 * (fidx + 1.0))  # lambda^(i+1)
        inter = model_dot((q.to(tl.float32) * q_decay[:, None]).to(dtype), state.to(dtype))
        scores = model_dot(q, tl.trans(k))
        scores = tl.where(causal, scores * tl.exp2(neg_slope_log2 * tl.maximum(diff, 0.0)), 0.0)
        out = inter + model_dot(scores.to(dtype), v)
        tl.store(out_ptr + rows[:, None] * stride_o_tok + head * stride_o_head + vdims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & vdim_mask[None, :])
        k_decay = tl.where(row_mask, tl.exp2(neg_slope_log2 * (n - 1 - fidx)), 0.0)  # lambda^(n-1-j)
        k_decayed = (k.to(tl.float32) * k_decay[:, None]).to(dtype)
        state = state * tl.exp2(neg_slope_log2 * n) + model_dot(tl.trans(k_decayed), v)
        if CHECKPOINTS:
            if end % ckpt_interval == 0:
                j = end // ckpt_interval - context // ckpt_interval - 1
                ckpt_slot = tl.load(ckpt_ptr + req * ckpt_stride + j).to(tl.int64)
                if ckpt_slot >= 0:
                    tl.store(state_ptr + ckpt_slot * stride_s_slot + s_offs, state, mask=s_mask)
    if slot >= 0:
        tl.store(state_ptr + slot * stride_s_slot + s_offs, state, mask=s_mask)


def lightning_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    slopes: torch.Tensor,  # [num_heads] float32
    state_pool: torch.Tensor,  # [num_slots, num_heads, head_dim, head_dim] float32
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    state_slots: torch.Tensor,  # [num_reqs] int32
    out: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    first_req: int,
    num_reqs: int,
    checkpoints: torch.Tensor | None = None,  # [num_reqs, max_boundaries] int32
    checkpoint_interval: int = 0,
) -> None:
    """The block scan for requests `first_req : first_req + num_reqs` (module docstring)."""
    if num_reqs == 0:
        return
    num_heads, head_dim = q.shape[1:]
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous()
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and out.stride(-1) == 1
    block = scan_block(checkpoint_interval)
    with_ckpts = checkpoints is not None and checkpoint_interval > 0
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = min(BLOCK_DV, block_d)
    _lightning_prefill_kernel[(num_reqs, num_heads, triton.cdiv(head_dim, block_dv))](
        q, k, v, out, slopes, state_pool, query_start_loc, seq_lens, state_slots,
        checkpoints if with_ckpts else state_slots, first_req, max(checkpoint_interval, 1),
        checkpoints.stride(0) if with_ckpts else 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), state_pool.stride(0), state_pool.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK=block, CHECKPOINTS=with_ckpts,
        num_warps=8 if block_d >= 128 else 4, num_stages=1,
    )


@triton.jit
def _lightning_decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, slopes_ptr, state_ptr, seq_lens_ptr, state_slots_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_o_tok, stride_o_head, stride_s_slot, stride_s_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    dv0 = tl.program_id(2) * BLOCK_DV
    slot = tl.load(state_slots_ptr + req).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    vdims = dv0 + tl.arange(0, BLOCK_DV)
    vdim_mask = vdims < HEAD_DIM
    out_offs = req.to(tl.int64) * stride_o_tok + head * stride_o_head + vdims
    if slot < 0:  # padding: output 0, no state
        tl.store(out_ptr + out_offs, tl.zeros([BLOCK_DV], tl.float32).to(out_ptr.dtype.element_ty),
                 mask=vdim_mask)
        return
    s_offs = slot * stride_s_slot + head * stride_s_head + dims[:, None] * HEAD_DIM + vdims[None, :]
    s_mask = dim_mask[:, None] & vdim_mask[None, :]
    state = tl.zeros([BLOCK_D, BLOCK_DV], tl.float32)
    if tl.load(seq_lens_ptr + req) > 1:  # else a one-token prompt: its slot holds nothing of it
        state = tl.load(state_ptr + s_offs, mask=s_mask, other=0.0)
    q = tl.load(q_ptr + req.to(tl.int64) * stride_q_tok + head * stride_q_head + dims, mask=dim_mask,
                other=0.0).to(tl.float32)
    k = tl.load(k_ptr + req.to(tl.int64) * stride_k_tok + head * stride_k_head + dims, mask=dim_mask,
                other=0.0).to(tl.float32)
    v = tl.load(v_ptr + req.to(tl.int64) * stride_v_tok + head * stride_v_head + vdims, mask=vdim_mask,
                other=0.0).to(tl.float32)
    decay = tl.exp2(-tl.load(slopes_ptr + head) * _LOG2E)
    state = state * decay + k[:, None] * v[None, :]
    out = tl.sum(q[:, None] * state, 0)
    tl.store(state_ptr + s_offs, state, mask=s_mask)
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=vdim_mask)


def lightning_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    slopes: torch.Tensor, state_pool: torch.Tensor,
    seq_lens: torch.Tensor,  # [>= num_decodes] int32
    state_slots: torch.Tensor,  # [>= num_decodes] int32; -1: padding (output 0)
    out: torch.Tensor,
) -> None:
    """The recurrent update for one token per request, in place on the state slots. Host ints
    only: graph-capturable."""
    num_decodes, num_heads, head_dim = q.shape
    if num_decodes == 0:
        return
    assert state_pool.dtype == torch.float32 and state_pool.is_contiguous()
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_dv = min(BLOCK_DV, block_d)
    _lightning_decode_kernel[(num_decodes, num_heads, triton.cdiv(head_dim, block_dv))](
        q, k, v, out, slopes, state_pool, seq_lens, state_slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), state_pool.stride(0), state_pool.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_DV=block_dv, num_warps=4,
    )
