"""The fp8 KV cache on the CPU: the number format against a brute-force table of all fp8 values,
`torch_native` attention on an fp8 cache against float32 attention, and the option's validation.
(The Triton kernels on an fp8 cache: tests/gpu/kernels/test_attention_kernels.py, `*_fp8`.)"""

from __future__ import annotations

import argparse

import pytest
import torch

from tokenmill.config import EngineArgs
from layer_context import attention_backend
from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.ops.kv_quant import FP8_KV_DTYPE, dequantize_fp8, quantize_fp8

pytestmark = pytest.mark.skipif(FP8_KV_DTYPE is None, reason="this torch has no float8_e4m3fn")


def all_fp8_values() -> torch.Tensor:
    """Every finite e4m3fn value, decoded from its bits by the format's definition (bias 7,
    3 mantissa bits, exponent 0 subnormal; 0x7f/0xff are NaN), ascending."""
    values = set()
    for bits in range(256):
        sign, exponent, mantissa = bits >> 7, (bits >> 3) & 0xF, bits & 0x7
        if exponent == 0xF and mantissa == 0x7:
            continue  # NaN
        if exponent == 0:
            magnitude = mantissa / 8 * 2.0 ** -6
        else:
            magnitude = (1 + mantissa / 8) * 2.0 ** (exponent - 7)
        values.add(-magnitude if sign else magnitude)
    return torch.tensor(sorted(values), dtype=torch.float64)


@pytest.mark.parametrize("scale", [1.0, 0.37, 4.0])
def test_quantize_rounds_to_the_nearest_fp8_value(scale):
    table = all_fp8_values()
    assert table.max() == 448.0 and len(table) == 253  # +-0 collapse to one value
    torch.manual_seed(0)
    x = torch.cat([torch.randn(20000) * 30, torch.randn(2000) * 0.01, torch.tensor([0.0, 1e6, -1e6])]) * scale
    stored = quantize_fp8(x, scale).double()
    y = (x / scale).double().clamp(-448, 448)  # the float32 quotient, as the format defines it
    nearest = (y[:, None] - table[None, :]).abs().min(dim=1).values
    # The stored value is a nearest representable one (ties may go either way)...
    assert torch.equal((stored - y).abs(), nearest)
    # ...which for normal values is within half a step of 3 mantissa bits.
    normal = y.abs() >= 2.0 ** -6
    assert ((stored[normal] - y[normal]).abs() <= y[normal].abs() * 2.0 ** -4).all()
    assert stored[-2] == 448 and stored[-1] == -448  # saturates, never inf/NaN
    assert torch.equal(dequantize_fp8(quantize_fp8(x, scale), scale), stored.float() * scale)


def test_round_trip_is_exact_on_representable_values():
    table = all_fp8_values().float()
    for scale in (1.0, 0.5, 8.0):  # powers of two: value * scale is exact
        assert torch.equal(dequantize_fp8(quantize_fp8(table * scale, scale), scale), table * scale)


def _meta(query_lens: list[int], seq_lens: list[int], block_size: int, num_blocks: int) -> AttentionMetadata:
    """Requests in order (decodes first), each with its own consecutive run of blocks."""
    max_blocks = max(-(-s // block_size) for s in seq_lens)
    block_table = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    slots, next_block = [], 0
    for i, (ql, sl) in enumerate(zip(query_lens, seq_lens)):
        n = -(-sl // block_size)
        block_table[i, :n] = torch.arange(next_block, next_block + n)
        next_block += n
        slots += [int(block_table[i, p // block_size]) * block_size + p % block_size for p in range(sl - ql, sl)]
    assert next_block <= num_blocks
    starts = torch.tensor([0] + query_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionMetadata(
        num_reqs=len(seq_lens), num_tokens=sum(query_lens), num_decodes=sum(q == 1 for q in query_lens),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc=starts, seq_lens=seq,
        block_table=block_table, slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc_cpu=starts, seq_lens_cpu=seq)


@pytest.mark.parametrize("magnitude,k_scale,v_scale", [(1.0, 1.0, 1.0), (1000.0, 16.0, 12.0)])
def test_torch_native_fp8_attention_close_to_float32(magnitude, k_scale, v_scale):
    """Decodes, a fresh prompt and a chunk after a cached prefix, on a float32 cache and on an fp8
    cache holding the same prefix. Large K/V need their scale: with scale 1.0 they saturate."""
    torch.manual_seed(0)
    block_size, num_kv_heads, group, head_dim, num_blocks = 16, 2, 4, 64, 64
    query_lens, seq_lens = [1, 1, 1, 40, 25], [9, 130, 64, 40, 25 + 150]
    meta = _meta(query_lens, seq_lens, block_size, num_blocks)
    num_tokens = meta.num_tokens
    q = torch.randn(num_tokens, num_kv_heads * group, head_dim)
    k = torch.randn(num_tokens, num_kv_heads, head_dim) * magnitude
    v = torch.randn(num_tokens, num_kv_heads, head_dim) * magnitude
    q /= magnitude  # scores of order 1 whatever the magnitude
    prefix_k = torch.randn(num_blocks, block_size, num_kv_heads, head_dim) * magnitude
    prefix_v = torch.randn(num_blocks, block_size, num_kv_heads, head_dim) * magnitude
    backend = attention_backend("torch_native")
    scale = head_dim ** -0.5
    ref = backend.forward(q, k, v, (prefix_k.clone(), prefix_v.clone()), meta, scale)
    fp8_cache = (quantize_fp8(prefix_k, k_scale), quantize_fp8(prefix_v, v_scale))
    out = backend.forward(q, k, v, fp8_cache, meta, scale, k_scale, v_scale)

    def rel(rows: slice) -> float:
        return ((out[rows] - ref[rows]).norm() / ref[rows].norm()).item()

    # Decodes read everything (their new token included) from the cache: fp8 error, but small.
    assert 1e-3 < rel(slice(0, 3)) < 5e-2
    # The chunk reads its prefix from the cache; a fresh prompt never touches it: exact.
    assert 1e-3 < rel(slice(43, num_tokens)) < 5e-2
    assert rel(slice(3, 43)) < 1e-6
    # The step's K/V went into the cache quantized with the scales.
    slots = meta.slot_mapping
    stored_k = dequantize_fp8(fp8_cache[0].view(-1, num_kv_heads, head_dim)[slots], k_scale)
    assert ((stored_k - k).norm() / k.norm()).item() < 5e-2
    if magnitude > 448:
        saturated = backend.forward(q, k, v, (quantize_fp8(prefix_k, 1.0), quantize_fp8(prefix_v, 1.0)),
                                    meta, scale)
        assert ((saturated[:3] - ref[:3]).norm() / ref[:3].norm()).item() > 0.2


def test_torch_native_fp8_write_skips_padding_slots():
    meta = _meta([1, 1], [3, 5], 4, 4)
    meta.slot_mapping[1] = -1
    cache = (torch.zeros(4, 4, 1, 8, dtype=FP8_KV_DTYPE), torch.zeros(4, 4, 1, 8, dtype=FP8_KV_DTYPE))
    k = torch.full((2, 1, 8), 3.0)
    attention_backend("torch_native").forward(torch.ones(2, 1, 8), k, -k, cache, meta, 1.0, 0.5, 2.0)
    k_flat, v_flat = (c.float().view(-1, 8) for c in cache)
    slot = int(meta.slot_mapping[0])
    assert (k_flat[slot] == 6.0).all() and (v_flat[slot] == -1.5).all()  # stored = x / scale
    assert torch.count_nonzero(k_flat) == 8 and torch.count_nonzero(v_flat) == 8


def test_kv_cache_dtype_values():
    cfg = EngineArgs(dtype="float32", kv_cache_dtype="fp8").create_engine_config()
    assert cfg.cache.kv_cache_dtype == torch.float8_e4m3fn
    assert EngineArgs(dtype="float32", kv_cache_dtype="fp8_e4m3").create_engine_config().cache.kv_cache_dtype \
        == torch.float8_e4m3fn
    assert EngineArgs(dtype="float32").create_engine_config().cache.kv_cache_dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, got 'int4'"):
        EngineArgs(kv_cache_dtype="int4").create_engine_config()
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    assert EngineArgs.from_cli_args(parser.parse_args([])).kv_cache_dtype == "auto"
    assert EngineArgs.from_cli_args(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_fp8_needs_torch_float8(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="needs torch.float8_e4m3fn"):
        EngineArgs(dtype="float32", kv_cache_dtype="fp8").create_engine_config()
