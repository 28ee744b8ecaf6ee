"""The CPU paged-decode kernel (`ops/cpu_paged_decode.cpp`, the cache read in place) against attention
computed in float64 on the gathered context: ragged lengths (one token, exactly a block, one past
it, long), blocks scattered over the pool, GQA groups of 1 to 7, head sizes 64 and 128 (and 96,
the kernel's general path), block sizes that are not powers of two, a query that is a strided
view, and the three dtypes. The kernel is built here as in the engine (a C++ compiler and ninja,
which CI has); a machine without them gets the gather + SDPA path, checked last."""

from __future__ import annotations

import pytest
import torch

from tokenmill.benchmarks.kernels.cpu_paged_decode import scattered_block_table
from tokenmill.ops import cpu_paged_decode

def _case(lens, kv_heads, group, head_dim, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table, pool = scattered_block_table(lens, block_size, gen, spare_columns=2)
    shape = (pool, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    # q as the kernel gets it in the engine: a view into a wider [tokens, q + k + v] projection.
    qkv = torch.randn(len(lens), (kv_heads * group + 2 * kv_heads) * head_dim, generator=gen).to(dtype)
    q = qkv[:, :kv_heads * group * head_dim].view(len(lens), kv_heads * group, head_dim)
    return q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32)


def _reference(q, k_cache, v_cache, table, lens, scale):
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(lens.tolist()):
        rows = [int(table[i, t // block_size]) * block_size + t % block_size for t in range(n)]
        keys = k_cache.reshape(-1, kv_heads, k_cache.shape[-1])[rows].double().repeat_interleave(group, 1)
        values = v_cache.reshape(-1, kv_heads, v_cache.shape[-1])[rows].double().repeat_interleave(group, 1)
        scores = torch.einsum("hd,thd->ht", q[i].double(), keys) * scale
        out[i] = torch.einsum("ht,thd->hd", scores.softmax(-1), values)
    return out


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # the output's rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("kv_heads,group,head_dim,block_size", [(3, 3, 64, 16), (2, 1, 128, 5), (1, 7, 64, 32),
                                                                 (4, 4, 128, 16),
                                                                 (2, 2, 96, 7)])
def test_matches_float64_attention(dtype, kv_heads, group, head_dim, block_size):
    lens = [1, block_size, block_size + 1, 3 * block_size - 1, 300]
    q, k_cache, v_cache, table, seq_lens = _case(lens, kv_heads, group, head_dim, block_size, dtype)
    scale = head_dim ** -0.5
    out = cpu_paged_decode.paged_decode(q, k_cache, v_cache, table, seq_lens, scale)
    assert out.shape == q.shape and out.dtype == dtype
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.double(), _reference(q, k_cache, v_cache, table, seq_lens, scale),
                               rtol=tol, atol=tol)


def test_peaked_scores_stay_finite():
    """Scores hundreds apart (softmax of a near one-hot): no overflow, the top key's value returned."""
    q, k_cache, v_cache, table, seq_lens = _case([40], 1, 2, 64, 16, torch.float32)
    scale = 64 ** -0.5
    k_cache *= 40
    out = cpu_paged_decode.paged_decode(q, k_cache, v_cache, table, seq_lens, scale)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), _reference(q, k_cache, v_cache, table, seq_lens, scale),
                               rtol=1e-5, atol=1e-5)


def test_refuses_what_it_does_not_compute():
    q, k_cache, v_cache, table, seq_lens = _case([5], 2, 2, 64, 16, torch.float32)
    with pytest.raises(RuntimeError, match="share a dtype"):
        cpu_paged_decode.paged_decode(q.bfloat16(), k_cache, v_cache, table, seq_lens, 1.0)
    with pytest.raises(RuntimeError, match="int32"):
        cpu_paged_decode.paged_decode(q, k_cache, v_cache, table.long(), seq_lens, 1.0)
    width = cpu_paged_decode.extension().vector_width()
    odd = torch.zeros(1, 2, width + 1)
    cache = torch.zeros(2, 16, 2, width + 1)
    with pytest.raises(RuntimeError, match="multiple of"):
        cpu_paged_decode.paged_decode(odd, cache, cache, table, seq_lens, 1.0)
    assert not cpu_paged_decode.supports(width + 1)


def test_without_the_kernel_the_backend_gathers(monkeypatch):
    from tokenmill.model.attention.cpu import CpuBackend
    monkeypatch.setattr(cpu_paged_decode, "extension", lambda: None)
    assert not cpu_paged_decode.supports(64)
    assert not CpuBackend(4, 2, 64, 0.125, native_decode=True).native_decode
