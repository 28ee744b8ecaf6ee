"""Sliding-window attention in the Triton decode and prefill kernels against `torch_native` with
the same window.

The blocks wholly before every query's window may have been freed and reused by another request,
so a kernel must not read them: these tests fill those blocks with NaN (a read would poison the
output even where the score is masked, since 0 * NaN = NaN). Windows are chosen not to be
multiples of the block size or the kernels' tile sizes. Runs on the GPU or under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernel_device import DEVICE  # noqa: F401  (skips the module without a GPU or the interpreter)
from test_attention_kernels import REL_TOL, gpu_only, make_batch, poisoned_like, rel_err  # noqa: E402

from layer_context import attention_backend  # noqa: E402
from tokenmill.model.attention.backend import AttentionMetadata  # noqa: E402
from tokenmill.ops.attention_decode import paged_decode  # noqa: E402
from tokenmill.ops.attention_prefill import paged_prefill  # noqa: E402
from tokenmill.ops.kv_cache_write import write_kv_cache  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def windowed_reference(batch, scale: float, window: int) -> torch.Tensor:
    """torch_native with the window, on float32 copies of everything (run before the poisoning)."""
    meta = AttentionMetadata(**{f: getattr(batch.meta, f) for f in batch.meta.__slots__})
    return attention_backend("torch_native").forward(
        batch.q.float(), batch.k.float(), batch.v.float(), (batch.k_cache.float(), batch.v_cache.float()),
        meta, scale, sliding_window=window)


def poison_outside_windows(batch, window: int) -> int:
    """NaN into every block wholly before the window of its request's first query of the step;
    returns how many blocks were poisoned (the test is only meaningful if some were)."""
    block_size = batch.k_cache.shape[1]
    starts = batch.meta.query_start_loc_cpu.tolist()
    poisoned = 0
    for i, seq_len in enumerate(batch.meta.seq_lens_cpu.tolist()):
        first_query = seq_len - (starts[i + 1] - starts[i])
        num_dead = max(0, first_query - window + 1) // block_size
        for b in batch.meta.block_table[i, :num_dead].tolist():
            batch.k_cache[b] = float("nan")
            batch.v_cache[b] = float("nan")
            poisoned += 1
    return poisoned


@pytest.mark.parametrize("window", [1, 7, 50, 100])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_paged_decode_window(window, group, num_splits):
    seq_lens = [1, 5, 17, 64, 65, 200, 333]
    head_dim, block_size = 64, 16
    batch = make_batch([1] * len(seq_lens), seq_lens, 2, group, head_dim, block_size)
    scale = head_dim ** -0.5
    ref = windowed_reference(batch, scale, window)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    assert poison_outside_windows(batch, window) > 0
    out = poisoned_like(batch.q)
    paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_table, batch.meta.seq_lens, out,
                 batch.meta.max_seq_len, scale, num_splits=num_splits, sliding_window=window)
    assert rel_err(out, ref) < REL_TOL


# (window, block_size, group, head_dim): each window compiles a kernel variant on the GPU.
@pytest.mark.parametrize("window,block_size,group,head_dim", [
    (1, 16, 4, 128), (7, 16, 1, 64), (7, 32, 4, 128), (50, 32, 1, 64), (100, 16, 4, 128), (100, 32, 1, 64)])
def test_paged_prefill_window(window, block_size, group, head_dim):
    # Fresh prompts longer and shorter than the window, and chunks after cached prefixes.
    query_lens = [37, 5, 130, 70, 1]
    seq_lens = [37 + 50, 5, 130 + 1000, 70, 1 + 40]
    batch = make_batch(query_lens, seq_lens, 2, group, head_dim, block_size, qkv_strided=True)
    # make_batch puts the one-token request first as a decode: run every row as a prefill here.
    batch.meta.num_decodes = 0
    scale = head_dim ** -0.5
    ref = windowed_reference(batch, scale, window)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    assert poison_outside_windows(batch, window) > 0
    out = poisoned_like(batch.q)
    meta = batch.meta
    paged_prefill(
        batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta.block_table, meta.query_start_loc,
        meta.seq_lens, out, first_req=0, num_reqs=meta.num_reqs, max_query_len=meta.max_query_len,
        scale=scale, sliding_window=window,
    )
    assert rel_err(out, ref) < REL_TOL


@pytest.mark.parametrize("window", [7, 100])
def test_backend_mixed_batch_window(window):
    """The whole Triton backend (cache write, decodes, prefill chunks) with a windowed layer."""
    query_lens = [1, 1, 1, 33, 80]
    seq_lens = [5, 130, 64, 33, 80 + 200]
    batch = make_batch(query_lens, seq_lens, 2, 4, 128, 16, qkv_strided=True)
    scale = 128 ** -0.5
    ref = windowed_reference(batch, scale, window)
    assert poison_outside_windows(batch, window) > 0
    out = attention_backend("triton").forward(batch.q, batch.k, batch.v, (batch.k_cache, batch.v_cache),
                                              batch.meta, scale, sliding_window=window)
    assert rel_err(out, ref) < REL_TOL


@gpu_only
@pytest.mark.parametrize("window", [4096, 1000])
def test_paged_decode_window_long(window):
    """Long contexts: the window bounds what each split reads; split counts from 1 to 32."""
    seq_lens = [32768, 1, 511, 4097, 16000]
    batch = make_batch([1] * len(seq_lens), seq_lens, 8, 4, 128, 16)
    scale = 128 ** -0.5
    ref = windowed_reference(batch, scale, window)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    assert poison_outside_windows(batch, window) > 0
    for num_splits in (None, 1, 32):
        out = poisoned_like(batch.q)
        paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_table, batch.meta.seq_lens, out,
                     batch.meta.max_seq_len, scale, num_splits=num_splits, sliding_window=window)
        assert rel_err(out, ref) < REL_TOL, f"num_splits={num_splits}"


@gpu_only
def test_paged_prefill_window_long_chunks():
    query_lens = [2048, 2048, 777]
    seq_lens = [2048, 2048 + 6000, 777 + 14000]
    batch = make_batch(query_lens, seq_lens, 8, 4, 128, 16)
    scale = 128 ** -0.5
    window = 4096
    ref = windowed_reference(batch, scale, window)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    assert poison_outside_windows(batch, window) > 0
    out = poisoned_like(batch.q)
    meta = batch.meta
    paged_prefill(
        batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta.block_table, meta.query_start_loc,
        meta.seq_lens, out, first_req=0, num_reqs=meta.num_reqs, max_query_len=meta.max_query_len,
        scale=scale, sliding_window=window,
    )
    assert rel_err(out, ref) < REL_TOL
