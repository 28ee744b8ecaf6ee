"""The batch-invariant Triton kernels (docs/rl.md): each against its reference, and each row's result
bit-identical however the rows are batched (the GEMM: alone or among many rows; attention: a
query decoded alone, in a decode batch, or inside a prefill chunk of any length).

GPU, or the CPU under TRITON_INTERPRET=1 (float16 there: the interpreter's bfloat16 `tl.dot` is
wrong). On the GPU the check that matters is the bitwise one: cuBLAS fails it across row counts.
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: F401  (skips the module without a GPU)

from tokenmill.ops.attention_batch_invariant import batch_invariant_attention, batch_invariant_attention_ref
from tokenmill.ops.matmul_batch_invariant import matmul, matmul_ref

DTYPE = torch.float16 if INTERPRET else torch.bfloat16


@pytest.mark.parametrize("dtype", [DTYPE, torch.float32])
def test_matmul_matches_reference_and_rows_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(0)
    K, N = 96, 80  # not multiples of the tiles: masked edges
    weight = (torch.randn(N, K, device=DEVICE) * 0.1).to(dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    x = torch.randn(150, K, device=DEVICE).to(dtype)
    full = matmul(x, weight, bias)
    ref = matmul_ref(x.float(), weight.float(), bias.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert ((full.float() - ref).norm() / ref.norm()).item() < tol
    for rows in (slice(0, 1), slice(7, 8), slice(3, 40), slice(64, 150)):
        assert torch.equal(matmul(x[rows], weight, bias), full[rows]), rows


def _paged_cache(seq_lens, num_kv_heads, head_dim, block_size, num_blocks=64):
    cache = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache, device=DEVICE).to(DTYPE)
    v_cache = torch.randn(cache, device=DEVICE).to(DTYPE)
    perm = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32)
    width = max(-(-s // block_size) for s in seq_lens)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32, device=DEVICE)
    used = 0
    for i, s in enumerate(seq_lens):
        n = -(-s // block_size)
        table[i, :n] = perm[used:used + n]
        used += n
    return k_cache, v_cache, table


def _attend(q, k_cache, v_cache, table, query_lens, seq_lens):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    qsl = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    batch_invariant_attention(q, k_cache, v_cache, table, qsl, lens, out, len(seq_lens), max(query_lens), 0.125)
    return out, qsl, lens


def test_attention_matches_reference_and_is_batch_invariant():
    torch.manual_seed(0)
    kv_heads, group, head_dim, block_size = 2, 2, 64, 16
    # One request whose last 40 positions are queried as one chunk; then each position again as a
    # decode (alone, and in a batch with two other requests): every row must agree bitwise.
    seq_len, chunk = 150, 40
    k_cache, v_cache, table = _paged_cache([seq_len, 70, 33], kv_heads, head_dim, block_size)
    q_chunk = torch.randn(chunk, kv_heads * group, head_dim, device=DEVICE).to(DTYPE)
    out, qsl, lens = _attend(q_chunk, k_cache, v_cache, table[:1], [chunk], [seq_len])
    ref = batch_invariant_attention_ref(q_chunk, k_cache, v_cache, table[:1], qsl, lens, 0.125)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    for j in (0, 17, chunk - 1):
        pos = seq_len - chunk + j  # the query's position: it attends keys [0, pos]
        alone, _, _ = _attend(q_chunk[j:j + 1], k_cache, v_cache, table[:1], [1], [pos + 1])
        assert torch.equal(alone[0], out[j]), j
        others = torch.randn(2, kv_heads * group, head_dim, device=DEVICE).to(DTYPE)
        batch_q = torch.cat([others[:1], q_chunk[j:j + 1], others[1:]])
        batched, _, _ = _attend(batch_q, k_cache, v_cache, table[[1, 0, 2]], [1, 1, 1], [70, pos + 1, 33])
        assert torch.equal(batched[1], out[j]), j
    # A shorter chunk of the same request: rows it shares with the long one agree too.
    tail, _, _ = _attend(q_chunk[25:], k_cache, v_cache, table[:1], [chunk - 25], [seq_len])
    assert torch.equal(tail, out[25:])
