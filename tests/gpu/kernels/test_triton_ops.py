"""Fused Triton ops (RMSNorm + residual, SiLU-and-mul, neox RoPE) against their torch references.

GPU only (skipped without CUDA); `TRITON_INTERPRET=1` also runs them on the CPU interpreter.
"""

from __future__ import annotations


import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402,F401  (skips the module without a GPU)

from tokenmill.ops.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from tokenmill.ops.rms_norm import rms_norm, rms_norm_ref  # noqa: E402
from tokenmill.ops.rotary import rope_neox_, rope_neox_ref  # noqa: E402

DTYPES = [torch.float16] if INTERPRET else [torch.bfloat16, torch.float16]
REL_TOL = 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or poisoned elements)"
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def poison_allocator(num_bytes: int) -> None:
    """Leave NaNs in the caching allocator's free memory so torch.empty outputs start poisoned."""
    if DEVICE.type == "cuda":
        torch.full((num_bytes // 2 + 4096,), float("nan"), dtype=torch.float16, device=DEVICE)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden", [(1, 1024), (7, 4096), (130, 8192), (33, 896), (5, 128)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, num_tokens, hidden, with_residual):
    x = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE) * 3
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE) if with_residual else None
    x_before = x.clone()
    poison_allocator(2 * x.numel() * x.element_size())
    got = rms_norm(x, weight, 1e-6, residual)
    want = rms_norm_ref(x, weight, 1e-6, residual)
    assert torch.equal(x, x_before), "the input must not be modified"
    if with_residual:
        assert torch.equal(got[1], want[1]), "the residual sum is rounded once, as in HF"
        assert rel_err(got[0], want[0]) < REL_TOL
    else:
        assert rel_err(got, want) < REL_TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_strided(dtype):
    """Qwen3's q/k norm: per-head RMSNorm on a strided [num_tokens, num_heads, head_dim] view."""
    num_tokens, num_heads, num_kv_heads, head_dim = 19, 16, 8, 128
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    weight = (1 + 0.1 * torch.randn(head_dim, device=DEVICE)).to(dtype)
    got = rms_norm(q, weight, 1e-6)
    assert got.shape == q.shape
    assert rel_err(got, rms_norm_ref(q, weight, 1e-6)) < REL_TOL


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,inter", [(1, 3072), (9, 14336), (256, 12288), (3, 1000)])
def test_silu_and_mul(dtype, num_tokens, inter):
    x = torch.randn(num_tokens, 2 * inter, dtype=dtype, device=DEVICE) * 2
    poison_allocator(x.numel() * x.element_size())
    got = silu_and_mul(x)
    assert rel_err(got, silu_and_mul_ref(x)) < REL_TOL


def _cos_sin_cache(max_pos: int, rotary_dim: int, base: float) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,rotary_dim",
    [(32, 8, 128, 128), (16, 8, 128, 128), (12, 12, 64, 64), (8, 2, 128, 64), (64, 8, 128, 128)],
)
@pytest.mark.parametrize("positions_dtype", [torch.int64, torch.int32])
def test_rope_neox(dtype, num_heads, num_kv_heads, head_dim, rotary_dim, positions_dtype):
    num_tokens, max_pos = 37, 40960
    cache = _cos_sin_cache(max_pos, rotary_dim, 1e6)
    positions = torch.randint(0, max_pos, (num_tokens,), device=DEVICE, dtype=positions_dtype)
    # q and k as views into one fused qkv output: strided, rotated in place.
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim: (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim:].clone()
    q_ref, k_ref = rope_neox_ref(q, k, positions, cache)
    rope_neox_(q, k, positions, cache)
    assert rel_err(q, q_ref) < REL_TOL
    assert rel_err(k, k_ref) < REL_TOL
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim:], v_before), "v must be untouched"
    if rotary_dim < head_dim:
        assert torch.equal(q[..., rotary_dim:], q_ref[..., rotary_dim:])


def test_rope_neox_matches_hf_rotate_half():
    """The neox layout is HF's `rotate_half`: q * cos + rotate_half(q) * sin with cos/sin repeated."""
    num_tokens, num_heads, head_dim = 5, 4, 64
    cache = _cos_sin_cache(128, head_dim, 1e4)
    positions = torch.tensor([0, 1, 2, 50, 127], device=DEVICE)
    q = torch.randn(num_tokens, num_heads, head_dim, dtype=torch.float32, device=DEVICE)
    k = torch.randn(num_tokens, 1, head_dim, dtype=torch.float32, device=DEVICE)
    half = head_dim // 2
    cos = cache[positions, :half].repeat(1, 2)[:, None, :]
    sin = cache[positions, half:].repeat(1, 2)[:, None, :]

    def rotate_half(x):
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    want_q = q * cos + rotate_half(q) * sin
    want_k = k * cos + rotate_half(k) * sin
    rope_neox_(q, k, positions, cache)
    assert rel_err(q, want_q) < 1e-5 and rel_err(k, want_k) < 1e-5
