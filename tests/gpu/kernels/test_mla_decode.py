"""The MLA Triton kernels against their torch references, and the Triton MLA backend against the
reference backend (`torch_native`) on mixed batches with cached prefixes.

GPU, or the CPU under `TRITON_INTERPRET=1` (float16 there: the interpreter's bfloat16 `tl.dot` is
wrong; DeepSeek's real 512 + 64 widths on the GPU only). Ragged context lengths, block
boundaries, padding rows (seq_len 0), several split counts, non-contiguous query views (as the
absorbed projection makes them) and the fp8 latent cache (unit and non-unit scales).
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402,F401  (skips the module without a GPU)

from layer_context import layers_for  # noqa: E402
from tokenmill.model.attention.backend import AttentionMetadata  # noqa: E402
from tokenmill.model.layers.rotary_embedding import RotaryEmbedding  # noqa: E402
from tokenmill.ops.kv_quant import FP8_KV_DTYPE, quantize_fp8  # noqa: E402
from tokenmill.ops.mla_cache_write import rope_and_write_latent, rope_and_write_latent_ref  # noqa: E402
from tokenmill.ops.mla_decode import mla_decode, mla_decode_ref  # noqa: E402

DTYPE = torch.float16 if INTERPRET else torch.bfloat16
gpu_only = pytest.mark.skipif(DEVICE.type != "cuda", reason="too slow for the Triton interpreter")
needs_fp8 = pytest.mark.skipif(FP8_KV_DTYPE is None, reason="this torch has no float8_e4m3fn")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or poisoned elements)"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-6)).item()


def paged_rows(seq_lens: list[int], block_size: int, width: int, fp8_scale: float | None = None):
    """A latent cache with random rows and a block table of scattered blocks per request."""
    blocks_per_req = [max(1, (s + block_size - 1) // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_req) + 5
    perm = torch.randperm(num_blocks, device=DEVICE, dtype=torch.int32)
    table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32, device=DEVICE)
    used = 0
    for i, n in enumerate(blocks_per_req):
        table[i, :n] = perm[used:used + n]
        used += n
    cache = torch.randn(num_blocks, block_size, width, device=DEVICE, dtype=DTYPE)
    if fp8_scale is not None:
        cache = quantize_fp8(cache, fp8_scale)
    return cache, table


def run_decode(seq_lens, num_heads, d_latent, d_rope, block_size, num_splits=None, fp8_scale=None,
               strided_q=False):
    cache, table = paged_rows(seq_lens, block_size, d_latent + d_rope, fp8_scale)
    batch = len(seq_lens)
    if strided_q:  # [heads, B, d] transposed, as torch.bmm leaves the absorbed query
        q_latent = torch.randn(num_heads, batch, d_latent, device=DEVICE, dtype=DTYPE).transpose(0, 1)
        out = torch.full((num_heads, batch, d_latent), float("nan"), device=DEVICE, dtype=DTYPE).transpose(0, 1)
    else:
        q_latent = torch.randn(batch, num_heads, d_latent, device=DEVICE, dtype=DTYPE)
        out = torch.full((batch, num_heads, d_latent), float("nan"), device=DEVICE, dtype=DTYPE)
    q_pe = torch.randn(batch, num_heads, 2 * d_rope, device=DEVICE, dtype=DTYPE)[..., :d_rope]  # strided
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    scale = (d_latent // 4) ** -0.5
    kv_scale = fp8_scale or 1.0
    mla_decode(q_latent, q_pe, cache, table, lens, out, max(seq_lens), scale, kv_scale, num_splits=num_splits)
    ref = mla_decode_ref(q_latent, q_pe, cache, table, lens, scale, kv_scale)
    return out, ref


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("num_heads", [4, 16, 20])
@pytest.mark.parametrize("block_size", [4, 16])
def test_mla_decode_ragged(num_splits, num_heads, block_size):
    # Lengths at, around and between block and tile boundaries; one padding row.
    seq_lens = [1, block_size, block_size + 1, 2 * block_size - 1, 37, 0, 70]
    out, ref = run_decode(seq_lens, num_heads, 64, 16, block_size, num_splits)
    assert rel_err(out, ref) < 1e-2
    assert (out[5] == 0).all(), "a padding row (seq_len 0) gets zeros"


@pytest.mark.parametrize("num_splits", [1, 4])
def test_mla_decode_strided_query_and_output(num_splits):
    out, ref = run_decode([9, 33, 2], 8, 32, 16, 8, num_splits, strided_q=True)
    assert rel_err(out, ref) < 1e-2


@needs_fp8
@pytest.mark.parametrize("fp8_scale", [1.0, 0.5])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_mla_decode_fp8_cache(fp8_scale, num_splits):
    out, ref = run_decode([5, 40, 17, 0], 16, 64, 16, 16, num_splits, fp8_scale=fp8_scale)
    assert rel_err(out, ref) < 1e-2


@gpu_only
@pytest.mark.parametrize("num_heads", [16, 128])
@pytest.mark.parametrize("fp8", [False, True])
def test_mla_decode_deepseek_widths(num_heads, fp8):
    """DeepSeek's 512 + 64 rows, V2-Lite's 16 heads and V3's 128, long and short contexts."""
    if fp8 and FP8_KV_DTYPE is None:
        pytest.skip("no float8_e4m3fn")
    out, ref = run_decode([1, 300, 4097, 64, 0, 2048], num_heads, 512, 64, 16, fp8_scale=1.0 if fp8 else None)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_rope_and_write_latent(interleaved, fp8):
    if fp8 and FP8_KV_DTYPE is None:
        pytest.skip("no float8_e4m3fn")
    num_tokens, num_heads, d_latent, d_rope, block_size = 7, 5, 48, 16, 4
    with layers_for("cpu"):
        cos_sin = RotaryEmbedding(d_rope, 64, 10000.0, None).cos_sin_cache.to(DEVICE)
    qkv = torch.randn(num_tokens, num_heads, 40, device=DEVICE, dtype=DTYPE)  # q_pe: a strided view
    kv_a = torch.randn(num_tokens, d_latent + d_rope, device=DEVICE, dtype=DTYPE)  # latent | k_pe
    positions = torch.tensor([0, 3, 9, 1, 30, 63, 12], device=DEVICE)
    slots = torch.tensor([5, -1, 0, 11, 2, 7, -1], device=DEVICE)
    cache_dtype = FP8_KV_DTYPE if fp8 else DTYPE
    caches = [torch.zeros(4, block_size, d_latent + d_rope, device=DEVICE, dtype=DTYPE).to(cache_dtype)
              for _ in range(2)]
    scale = 0.5 if fp8 else 1.0
    q_pe, k_pe = qkv[..., 24:], kv_a[:, d_latent:]
    q_ref, k_ref = rope_and_write_latent_ref(q_pe.clone(), k_pe.clone(), kv_a[:, :d_latent], caches[0], slots,
                                             positions, cos_sin, scale, interleaved)
    latent = kv_a[:, :d_latent].contiguous()
    rope_and_write_latent(q_pe, k_pe, latent, caches[1], slots, positions, cos_sin, scale, interleaved)
    torch.testing.assert_close(q_pe, q_ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(k_pe, k_ref, rtol=2e-3, atol=2e-3)
    assert_same_cache(caches[1], caches[0])


def assert_same_cache(cache: torch.Tensor, ref: torch.Tensor) -> None:
    """The Triton write must leave the reference's bytes. Triton's interpreter rounds float32 ->
    fp8 wrongly when rounding carries into the exponent (test_attention_kernels.write_fp8; the
    GPU's conversion is right), so there an fp8 cache is compared by value, within an fp8 step."""
    if INTERPRET and cache.dtype == FP8_KV_DTYPE:
        torch.testing.assert_close(cache.float(), ref.float(), rtol=0.5, atol=2e-3)
    else:
        assert torch.equal(cache.view(torch.uint8), ref.view(torch.uint8))


def _mla_layer(backend: str, num_heads: int, dims: dict, weight: torch.Tensor):
    from tokenmill.model.attention.mla import MLAAttention
    from tokenmill.model.attention.mla_backend import MLADims
    from tokenmill.model.layers.linear import ColumnParallelLinear

    with layers_for("cpu" if DEVICE.type == "cpu" else "cuda", attention_backend=backend), torch.device(DEVICE):
        kv_b = ColumnParallelLinear(dims["rank"], num_heads * (dims["nope"] + dims["v"])).to(DTYPE)
        kv_b.weight.data.copy_(weight)
        layer = MLAAttention(MLADims(num_heads, dims["rank"], dims["nope"], dims["rope"], dims["v"]),
                             (dims["nope"] + dims["rope"]) ** -0.5, kv_b, interleaved_rope=True)
    return layer


@pytest.mark.parametrize("fp8", [False, True])
def test_triton_mla_backend_matches_reference(fp8):
    """Decodes and prefills (fresh, and chunks with a cached prefix crossing block boundaries) in
    one step through the whole layer: rotary + cache write, absorbed decode, expanded prefill."""
    if fp8 and FP8_KV_DTYPE is None:
        pytest.skip("no float8_e4m3fn")
    torch.manual_seed(0)
    num_heads, block_size = 4, 4
    dims = dict(rank=32, nope=16, rope=16, v=24)
    weight = torch.randn(num_heads * (dims["nope"] + dims["v"]), dims["rank"], device=DEVICE, dtype=DTYPE) * 0.2
    layers = [_mla_layer(b, num_heads, dims, weight) for b in ("torch_native", "triton")]
    query_lens, seq_lens = [1, 1, 6, 5, 3], [9, 4, 6, 14, 11]  # decodes, a fresh prompt, two chunks
    num_reqs, num_tokens = len(seq_lens), sum(query_lens)
    blocks = [(s + block_size - 1) // block_size for s in seq_lens]
    table = torch.zeros(num_reqs, max(blocks), dtype=torch.int32, device=DEVICE)
    perm = torch.randperm(sum(blocks) + 3, dtype=torch.int32, device=DEVICE)
    slots, positions, used = [], [], 0
    for i, (n, q_len, s) in enumerate(zip(blocks, query_lens, seq_lens)):
        table[i, :n] = perm[used:used + n]
        used += n
        for pos in range(s - q_len, s):
            positions.append(pos)
            slots.append(int(table[i, pos // block_size]) * block_size + pos % block_size)
    width = dims["rank"] + dims["rope"]
    cache = torch.randn(sum(blocks) + 3, block_size, width, device=DEVICE, dtype=DTYPE)  # the cached prefixes
    if fp8:
        cache = quantize_fp8(cache, 1.0)
    starts = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta = AttentionMetadata(
        num_reqs=num_reqs, num_tokens=num_tokens, num_decodes=2, max_query_len=max(query_lens),
        max_seq_len=max(seq_lens), query_start_loc=starts.to(DEVICE), seq_lens=lens.to(DEVICE), block_table=table,
        slot_mapping=torch.tensor(slots, device=DEVICE), query_start_loc_cpu=starts, seq_lens_cpu=lens)
    with layers_for("cpu"):
        rotary = RotaryEmbedding(dims["rope"], 64, 10000.0, None).to(DEVICE)
    positions = torch.tensor(positions, device=DEVICE)
    q = torch.randn(num_tokens, num_heads, dims["nope"] + dims["rope"], device=DEVICE, dtype=DTYPE)
    latent = torch.randn(num_tokens, dims["rank"], device=DEVICE, dtype=DTYPE)
    k_pe = torch.randn(num_tokens, dims["rope"], device=DEVICE, dtype=DTYPE)
    outs, caches = [], []
    for layer in layers:
        layer_cache = cache.clone()
        rope = rotary.forward_native(positions, DTYPE)
        outs.append(layer(q.clone(), latent, k_pe.clone(), layer_cache, meta, rope))
        caches.append(layer_cache)
    # With fp8 the rows written this step (which the decodes read back) can land an fp8 step apart
    # where the two backends' rotated keys differ in the last bit (and under the interpreter, its
    # float32 -> fp8 rounding): a looser bound.
    assert rel_err(outs[1], outs[0]) < (3e-2 if fp8 else 1e-2)
    # The latents are copied as they are; the reference rotates keys in the model dtype, the
    # kernel in float32 (rounded once): the rope columns agree to rounding. The reference rounds
    # x*cos, y*sin and their sum to bf16 each, so an element may land two bf16 steps away (seen on
    # an H100: 0.0078 at 0.58), hence 2**-6 relative; fp8 allows one fp8 step.
    rank = dims["rank"]
    assert_same_cache(caches[1][..., :rank].contiguous(), caches[0][..., :rank].contiguous())
    rope_tol = dict(rtol=0.5, atol=2e-3) if fp8 else dict(rtol=2 ** -6, atol=2e-3)
    torch.testing.assert_close(caches[1][..., rank:].float(), caches[0][..., rank:].float(), **rope_tol)
