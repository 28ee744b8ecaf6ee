"""The CPU attention backend (`model/attention/cpu.py`, one opaque op per layer) against the
`torch_native` reference: same K/V written to the paged cache, same outputs, on ragged batches of
decodes and prefills with cached prefixes; and the op traces into a compiled graph."""

from __future__ import annotations

import pytest
import torch

from tokenmill.benchmarks.kernels.cpu_paged_decode import scattered_block_table
from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.attention.cpu import CpuBackend
from tokenmill.model.attention.torch_native import TorchNativeBackend


def _batch(query_lens, seq_lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    table, num_blocks = scattered_block_table(seq_lens, block_size, gen, spare_columns=2)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    cache = (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
    slots = []
    for i, (q_len, s_len) in enumerate(zip(query_lens, seq_lens)):
        for t in range(s_len - q_len, s_len):
            slots.append(int(table[i, t // block_size]) * block_size + t % block_size)
    tokens = sum(query_lens)
    qkv = [torch.randn(tokens, h, head_dim, generator=gen).to(dtype) for h in (num_heads, num_kv_heads, num_kv_heads)]
    starts = torch.tensor([0] + list(torch.tensor(query_lens).cumsum(0)), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        num_reqs=len(seq_lens), num_tokens=tokens, num_decodes=sum(1 for q in query_lens if q == 1),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc=starts, seq_lens=lens,
        block_table=table, slot_mapping=torch.tensor(slots, dtype=torch.long),
        query_start_loc_cpu=starts, seq_lens_cpu=lens)
    return qkv, cache, meta


CASES = {
    "decodes": ([1, 1, 1], [1, 17, 40]),
    "one decode": ([1], [37]),  # equal lengths: the context is sliced, no mask
    "equal decodes": ([1, 1], [21, 21]),
    "prefills": ([5, 12], [5, 30]),
    "mixed": ([1, 1, 9, 3, 16], [33, 2, 9, 20, 16]),
    "fresh prefills": ([1, 1, 7, 16], [12, 30, 7, 16]),  # the native op's whole-step C++ path
    "one fresh prefill": ([11], [11]),
}


@pytest.mark.parametrize("native", [False, True], ids=["sdpa", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("group", [1, 3])
def test_cpu_backend_matches_torch_native(case, dtype, group, native):
    (q, k, v), cache, meta = _batch(*CASES[case], num_kv_heads=2, group=group, head_dim=16, block_size=4,
                                    dtype=dtype)
    scale = 16 ** -0.5
    ref_cache = tuple(c.clone() for c in cache)
    ref = TorchNativeBackend(2 * group, 2, 16, scale).forward(q.clone(), k.clone(), v.clone(), ref_cache, meta)
    backend = CpuBackend(2 * group, 2, 16, scale, native_decode=native)
    assert backend.native_decode == native  # (the kernel builds on this machine)
    out = backend.forward(q.clone(), k.clone(), v.clone(), cache, meta)
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("case", ["fresh prefills", "one fresh prefill"])
def test_native_op_runs_bf16_prompts_through_the_prefill_kernel(case):
    """At a head size the prefill kernel takes (ops/cpu_flash_prefill.cpp), the native op's prompts
    go through it where the machine has AMX or AVX512-BF16 (no SDPA call), else through SDPA;
    either way the result is torch_native's."""
    from tokenmill.ops import cpu_flash_prefill

    query_lens, seq_lens = CASES[case]
    # Prompts of 63-144 tokens (the lengths x 9), decodes of one token against 108-270.
    (q, k, v), cache, meta = _batch([n if n == 1 else n * 9 for n in query_lens], [n * 9 for n in seq_lens],
                                    num_kv_heads=2, group=3, head_dim=64,
                                    block_size=16, dtype=torch.bfloat16)
    ref_cache = tuple(c.clone() for c in cache)
    ref = TorchNativeBackend(6, 2, 64, 0.125).forward(q.clone(), k.clone(), v.clone(), ref_cache, meta)
    backend = CpuBackend(6, 2, 64, 0.125, native_decode=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = backend.forward(q.clone(), k.clone(), v.clone(), cache, meta)
    names = {event.name for event in prof.events()}
    assert "tokenmill::cpu_paged_attention_native" in names
    assert ("aten::scaled_dot_product_attention" in names) != cpu_flash_prefill.supported(64)
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("case,in_cpp", [("fresh prefills", True), ("one fresh prefill", True), ("decodes", True),
                                         ("mixed", False)])
def test_native_op_stays_in_cpp_for_decodes_and_fresh_prefills(case, in_cpp):
    """A step of decodes and prompts with nothing cached runs in C++; one with a cached prefix
    calls the Python op (seen by the profiler)."""
    (q, k, v), cache, meta = _batch(*CASES[case], num_kv_heads=2, group=3, head_dim=16, block_size=4,
                                    dtype=torch.bfloat16)
    backend = CpuBackend(6, 2, 16, 0.25, native_decode=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        backend.forward(q, k, v, cache, meta)
    names = {event.name for event in prof.events()}
    assert "tokenmill::cpu_paged_attention_native" in names
    assert ("tokenmill::cpu_paged_attention" in names) != in_cpp


def test_cpu_backend_writes_no_kv_for_padding_slots():
    (q, k, v), cache, meta = _batch([1, 1], [3, 6], num_kv_heads=1, group=2, head_dim=8, block_size=4,
                                    dtype=torch.float32)
    meta.slot_mapping[1] = -1
    before = cache[0].clone()
    CpuBackend(2, 1, 8, 1.0, native_decode=False).forward(q, k, v, cache, meta)
    changed = (cache[0] != before).any(dim=(1, 2, 3)).nonzero().flatten().tolist()
    assert changed == [int(meta.slot_mapping[0]) // 4]


@pytest.mark.parametrize("native", [False, True], ids=["sdpa", "native"])
def test_cpu_attention_op_compiles_without_specialising_on_lengths(native):
    backend = CpuBackend(4, 2, 16, 0.25, native_decode=native)
    compiled = torch.compile(lambda q, k, v, cache, meta: backend.forward(q, k, v, cache, meta) * 2,
                             fullgraph=True, dynamic=True)
    for case in ("decodes", "mixed"):
        (q, k, v), cache, meta = _batch(*CASES[case], num_kv_heads=2, group=2, head_dim=16, block_size=4,
                                        dtype=torch.float32)
        ref_cache = tuple(c.clone() for c in cache)
        ref = TorchNativeBackend(4, 2, 16, 0.25).forward(q, k, v, ref_cache, meta) * 2
        torch.testing.assert_close(compiled(q, k, v, cache, meta), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(cache[1], ref_cache[1])
