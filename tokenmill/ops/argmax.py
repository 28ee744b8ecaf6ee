"""Row-wise argmax over the vocab on CUDA, in two small Triton launches.

Greedy decoding takes `logits.argmax(dim=-1)` every step. At batch 1 PyTorch reduces a
[1, 128256] row with a single block: 27 us per step on the H200 (`aten::argmax ... 26.998us`
in docs/results/session6/x2_profile_llama8b_b1_tp2.log), a noticeable slice of a decode step.
Here each row is cut into chunks of `_CHUNK` elements spread over many programs (stage 1), and a
second tiny launch merges the per-chunk winners (stage 2). Nothing is read on the host and no
state persists between calls, so it runs asynchronously and inside CUDA graphs.

The result is exactly `torch.argmax(x, dim=-1)`: the first index of the maximum, with NaN larger
than everything (the first NaN wins), -0.0 equal to +0.0 and infinities in their places. Rather
than rely on how `tl.max` treats NaN floats, values are compared as int32 keys that order like
the floats: a non-negative float's bits are already ordered, a negative float becomes minus its
magnitude bits (so -0.0 and +0.0 both map to 0), and every NaN maps to INT32_MAX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements per stage-1 program: 32 programs per row at vocab 128k, enough to spread one row over
# the GPU while keeping stage 2 a single small load per row.
_CHUNK = 4096
# Elements per load step inside a chunk (8 fp32 per thread at 4 warps: two 16-byte loads).
_BLOCK = 1024
_NUM_WARPS = 4

# The int32 extremes, named for what they mean in the kernels (globals used in a kernel must be
# constexprs).
_KEY_MIN = tl.constexpr(-2147483648)  # below every real key: padding and "nothing yet"
_KEY_MAX = tl.constexpr(2147483647)  # the key of every NaN; also "no index yet"


@triton.jit
def _order_key(x):
    """float -> int32 that orders as torch.argmax compares the floats (see the module docstring)."""
    bits = x.to(tl.float32).to(tl.int32, bitcast=True)  # bf16/fp16 -> fp32 is exact, NaN stays NaN
    magnitude = bits & 0x7FFFFFFF
    key = tl.where(bits < 0, -magnitude, bits)
    return tl.where(magnitude > 0x7F800000, _KEY_MAX, key)  # NaN: above +inf (0x7F800000)


# The row count only shapes the grid and no argument varies from step to step (V, the row
# stride and the chunk count are fixed for a model), so a new batch size never compiles a new
# variant. V and the stride stay specialisable: divisibility by 16 lets Triton vectorise loads.
@triton.jit
def _chunk_argmax_kernel(x_ptr, key_ptr, idx_ptr, out_ptr, V, stride_row, num_chunks,
                         CHUNK: tl.constexpr, BLOCK: tl.constexpr, SINGLE_CHUNK: tl.constexpr):
    """Stage 1, grid (rows, num_chunks): the max key of one chunk of a row and its first index."""
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = x_ptr + row.to(tl.int64) * stride_row
    cols = tl.arange(0, BLOCK)
    # One running best per lane; lanes are only combined after the loop (no reduction per step).
    # Masked-off elements load as INT32_MIN, below every real key (-inf is -0x7F800000), and the
    # strict `>` keeps each lane's earliest index on ties.
    best_key = tl.full([BLOCK], _KEY_MIN, tl.int32)
    best_idx = tl.full([BLOCK], _KEY_MAX, tl.int32)
    for start in tl.static_range(0, CHUNK, BLOCK):
        offs = chunk * CHUNK + start + cols
        mask = offs < V
        x = tl.load(row_ptr + offs, mask=mask, other=0.0)
        key = tl.where(mask, _order_key(x), _KEY_MIN)
        better = key > best_key
        best_key = tl.where(better, key, best_key)
        best_idx = tl.where(better, offs, best_idx)
    # Every chunk holds at least one real element, so only lanes that saw the max hold it.
    max_key = tl.max(best_key, axis=0)
    first_idx = tl.min(tl.where(best_key == max_key, best_idx, _KEY_MAX), axis=0)
    if SINGLE_CHUNK:
        tl.store(out_ptr + row, first_idx.to(tl.int64))  # the whole row: no stage 2
    else:
        tl.store(key_ptr + row * num_chunks + chunk, max_key)
        tl.store(idx_ptr + row * num_chunks + chunk, first_idx)


@triton.jit
def _merge_kernel(key_ptr, idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    """Stage 2, grid (rows,): the largest chunk key and, among equal keys, the smallest index."""
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    mask = c < num_chunks
    keys = tl.load(key_ptr + row * num_chunks + c, mask=mask, other=_KEY_MIN)
    idxs = tl.load(idx_ptr + row * num_chunks + c, mask=mask, other=_KEY_MAX)
    max_key = tl.max(keys, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(keys == max_key, idxs, _KEY_MAX), axis=0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """`torch.argmax(x, dim=-1)` for x [rows, V] (float32, bfloat16 or float16, contiguous in its
    last dim), as int64 [rows] on x's device; asynchronous and CUDA-graph capturable."""
    assert x.dim() == 2 and x.stride(1) == 1, "argmax_rows wants [rows, V] contiguous in V"
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), x.dtype
    rows, vocab = x.shape
    assert 0 < vocab < 2**31, "indices are int32 inside the kernels"
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    num_chunks = triton.cdiv(vocab, _CHUNK)
    single = num_chunks == 1
    # Per-chunk partials, [2, rows, num_chunks]: keys, then first indices (one allocation). The
    # rows are padded to a multiple of 4 so the second half starts a multiple of 16 bytes in
    # whatever the row count: Triton specialises on 16-byte alignment and would otherwise compile
    # a variant of both kernels for odd row counts mid-serving.
    padded_rows = -(-rows // 4) * 4
    partials = torch.empty((1,) if single else (2, padded_rows, num_chunks), dtype=torch.int32, device=x.device)
    keys, idxs = (partials, partials) if single else (partials[0], partials[1])
    _chunk_argmax_kernel[(rows, num_chunks)](
        x, keys, idxs, out, vocab, x.stride(0), num_chunks,
        CHUNK=_CHUNK, BLOCK=_BLOCK, SINGLE_CHUNK=single, num_warps=_NUM_WARPS)
    if not single:
        _merge_kernel[(rows,)](keys, idxs, out, num_chunks,
                               BLOCK_C=triton.next_power_of_2(num_chunks), num_warps=1)
    return out
