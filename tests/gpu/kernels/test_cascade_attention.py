"""Cascade decode (a prefix shared by every request, attended once) against `torch_native`.

Runs where the other kernel tests run: the GPU, or the CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import random

import pytest
import torch

from kernel_device import DEVICE  # noqa: F401  (skips the module without a GPU or the interpreter)
from test_attention_kernels import (  # noqa: E402
    REL_TOL,
    gpu_only,
    make_batch,
    poisoned_like,
    reference,
    rel_err,
    to_fp8,
    write_fp8,
)

from layer_context import attention_backend  # noqa: E402
from tokenmill.ops.attention_cascade import cascade_decode  # noqa: E402
from tokenmill.ops.attention_decode import paged_decode  # noqa: E402
from tokenmill.ops.kv_cache_write import write_kv_cache  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)


def share_prefix(batch, num_blocks: int) -> torch.Tensor:
    """Point the first `num_blocks` table entries of every row at row 0's blocks (what the prefix
    cache does for a shared prompt prefix); returns the prefix length in tokens as the kernel
    reads it. Every context must reach past the shared blocks (a decode's new token never sits in
    a shared block)."""
    block_size = batch.k_cache.shape[1]
    assert all(int(n) > num_blocks * block_size for n in batch.meta.seq_lens_cpu)
    table = batch.meta.block_table
    table[:, :num_blocks] = table[0, :num_blocks]
    return torch.tensor([num_blocks * block_size], dtype=torch.int32, device=DEVICE)


def run_cascade(batch, prefix_len, scale, **kwargs) -> torch.Tensor:
    out = poisoned_like(batch.q)
    cascade_decode(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_table, batch.meta.seq_lens,
                   prefix_len, out, scale, **kwargs)
    return out


@pytest.mark.parametrize("block_size,group,head_dim", [(16, 4, 128), (16, 1, 64), (32, 8, 64), (16, 7, 64)])
@pytest.mark.parametrize("num_prefix_splits", [None, 1, 3, 7])
def test_cascade_decode_matches_reference(block_size, group, head_dim, num_prefix_splits):
    """Prefix lengths off the 64-token tile (5 blocks of 16: 80 tokens), more splits than tiles
    (empty lanes), contexts ending one token past the prefix, and a batch spanning several
    request chunks (19 requests at group 4: 16 + 3)."""
    seq_lens = [81, 82, 200, 333, 97, 160, 81, 500, 129, 90, 250, 81, 300, 111, 222, 333, 88, 99, 400]
    batch = make_batch([1] * len(seq_lens), seq_lens, 2, group, head_dim, block_size)
    prefix_len = share_prefix(batch, 80 // block_size)
    scale = head_dim ** -0.5
    ref, _, _ = reference(batch, scale)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = run_cascade(batch, prefix_len, scale, num_prefix_splits=num_prefix_splits)
    assert rel_err(out, ref) < REL_TOL


def test_cascade_decode_without_prefix_is_plain_decode():
    """prefix_len 0 (a graph replayed for a batch that shares nothing): no prefix work, and the
    output is the plain decode's."""
    seq_lens = [1, 17, 64, 65, 300]
    batch = make_batch([1] * len(seq_lens), seq_lens, 2, 4, 128, 16)
    scale = 128 ** -0.5
    ref, _, _ = reference(batch, scale)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = run_cascade(batch, torch.zeros(1, dtype=torch.int32, device=DEVICE), scale)
    assert rel_err(out, ref) < REL_TOL
    plain = poisoned_like(batch.q)
    paged_decode(batch.q, batch.k_cache, batch.v_cache, batch.meta.block_table, batch.meta.seq_lens, plain,
                 batch.meta.max_seq_len, scale, num_splits=1)
    assert torch.equal(out, plain)


def test_cascade_decode_with_padding_rows():
    """Rows padded onto a graph's batch (seq_len 0, table row 0s) leave the real rows right."""
    seq_lens = [150, 70, 260]
    batch = make_batch([1] * len(seq_lens), seq_lens, 2, 4, 64, 16)
    prefix_len = share_prefix(batch, 4)
    scale = 0.125
    ref, _, _ = reference(batch, scale)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    q = torch.cat([batch.q, torch.randn_like(batch.q[:2])])
    seq = torch.cat([batch.meta.seq_lens, torch.zeros(2, dtype=torch.int32, device=DEVICE)])
    table = torch.cat([batch.meta.block_table, torch.zeros_like(batch.meta.block_table[:2])])
    out = poisoned_like(q)
    cascade_decode(q, batch.k_cache, batch.v_cache, table, seq, prefix_len, out, scale)
    assert rel_err(out[:3], ref) < REL_TOL


@pytest.mark.parametrize("scales", [(0.37, 1.9), (1.0, 1.0)], ids=["scaled", "unit"])
def test_cascade_decode_fp8(scales):
    seq_lens = [129, 140, 300, 200, 131]
    batch = to_fp8(make_batch([1] * len(seq_lens), seq_lens, 2, 4, 128, 16), scales)
    prefix_len = share_prefix(batch, 8)
    scale = 128 ** -0.5
    ref, k_ref, v_ref = reference(batch, scale, k_scale=scales[0], v_scale=scales[1])
    write_fp8(batch, k_ref, v_ref, scales=scales)
    out = run_cascade(batch, prefix_len, scale, k_scale=scales[0], v_scale=scales[1])
    assert rel_err(out, ref) < REL_TOL


def test_cascade_decode_float32():
    """A float32 model (the parity tests' dtype) takes the smaller-stage configuration."""
    seq_lens = [600, 530, 700, 1000]
    batch = make_batch([1] * len(seq_lens), seq_lens, 2, 4, 128, 16)
    prefix_len = share_prefix(batch, 32)
    for name in ("q", "k", "v", "k_cache", "v_cache"):
        setattr(batch, name, getattr(batch, name).float())
    scale = 128 ** -0.5
    ref, _, _ = reference(batch, scale)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    out = run_cascade(batch, prefix_len, scale)
    assert rel_err(out, ref) < REL_TOL  # (tl.dot takes float32 inputs as TF32 on the GPU)


@gpu_only
def test_cascade_decode_long_shared_prefix():
    """The prefix benchmark's shape, smaller: 64 requests sharing 1,536 of ~2k tokens."""
    seq_lens = [1537 + random.randint(0, 640) for _ in range(64)]
    batch = make_batch([1] * len(seq_lens), seq_lens, 8, 4, 128, 16)
    prefix_len = share_prefix(batch, 96)
    scale = 128 ** -0.5
    ref, _, _ = reference(batch, scale)
    write_kv_cache(batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta.slot_mapping)
    outs = [run_cascade(batch, prefix_len, scale) for _ in range(3)]
    assert rel_err(outs[0], ref) < REL_TOL
    assert all(torch.equal(o, outs[0]) for o in outs[1:])  # no race between the two launches


@gpu_only
def test_backend_cascade_decode_cuda_graph():
    """One captured backend step (cascade form) replays right for a shared prefix of any length,
    0 included, as the model runner's cascade graphs do."""
    num_reqs, num_kv_heads, group, head_dim, block_size = 48, 8, 4, 128, 16
    backend = attention_backend("triton")
    seq_lens = [random.randint(700, 1200) for _ in range(num_reqs)]
    static = make_batch([1] * num_reqs, seq_lens, num_kv_heads, group, head_dim, block_size)
    meta = static.meta
    meta.common_prefix_len = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    kv = (static.k_cache, static.v_cache)
    backend.forward(static.q.clone(), static.k, static.v, kv, meta, scale)  # warm-up (compiles)
    graph = torch.cuda.CUDAGraph()
    q_in = static.q.clone()
    with torch.cuda.graph(graph):
        static_out = backend.forward(q_in, static.k, static.v, kv, meta, scale)
    table = meta.block_table.clone()
    for shared_blocks in (0, 40, 10, 43):
        meta.block_table.copy_(table)
        meta.block_table[:, :shared_blocks] = table[0, :shared_blocks]
        ref, _, _ = reference(static, scale)  # (the table now shares the prefix)
        meta.common_prefix_len.fill_(shared_blocks * block_size)
        static_out.fill_(float("nan"))
        graph.replay()
        assert rel_err(static_out, ref) < REL_TOL, f"shared_blocks={shared_blocks}"
