"""The causal prefill kernel (`ops/cpu_flash_prefill.cpp`) against attention computed in float64 from
the same bf16 inputs, through both of its product paths (the AMX tiles and the AVX512-BF16 dot
products, each where the CPU has it; an AMX machine runs both): prompt lengths around its tile edges
(1 token, 31-33, one key block of 256 and one past it, several blocks), GQA groups of 1 to 4, head
sizes 32, 64 and 128, q and k as strided views of a fused QKV projection, and scores peaked enough
to move the running maximum late. Its error is held to what SDPA's own bf16 kernel makes on the
same inputs (both round the probabilities to bf16). Elsewhere the native op keeps SDPA, which
tests/unit/test_cpu_attention.py covers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.ops import cpu_flash_prefill

pytestmark = pytest.mark.skipif(not cpu_flash_prefill.supported(64), reason="no AMX or AVX512-BF16 here")

# The engine's choice (the tiles where they are), and the dot-product path forced.
PATHS = [pytest.param(False, id="engine"),
         pytest.param(True, id="dots", marks=pytest.mark.skipif(not cpu_flash_prefill.supported(64, dots=True),
                                                                  reason="no AVX512-BF16 here"))]


def _inputs(tokens, kv_heads, group, head_dim, seed=0, peak=1.0):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=gen) * peak).to(torch.bfloat16)
    q = qkv[:, :heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim:(heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim:].view(tokens, kv_heads, head_dim)
    return q, k, v


def _reference(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    qd, kd, vd = (x.double().transpose(0, 1) for x in (q, k, v))
    kd, vd = kd.repeat_interleave(group, 0), vd.repeat_interleave(group, 0)
    scores = qd @ kd.transpose(-1, -2) * scale
    t = q.shape[0]
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    return (scores.softmax(-1) @ vd).transpose(0, 1)


def _sdpa(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    heads_first = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*heads_first, is_causal=True, scale=scale,
                                          enable_gqa=group > 1).squeeze(0).transpose(0, 1)


@pytest.mark.parametrize("dots", PATHS)
@pytest.mark.parametrize("tokens", [1, 2, 31, 32, 33, 255, 256, 257, 600])
@pytest.mark.parametrize("kv_heads,group,head_dim", [(3, 3, 64), (2, 1, 128), (1, 4, 32), (2, 2, 64)])
def test_matches_float64_attention(tokens, kv_heads, group, head_dim, dots):
    q, k, v = _inputs(tokens, kv_heads, group, head_dim, seed=tokens)
    scale = head_dim ** -0.5
    out = cpu_flash_prefill.flash_prefill(q, k, v, scale, dots=dots)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    expected = _reference(q, k, v, scale)
    error = (out.double() - expected).abs().max().item()
    sdpa_error = (_sdpa(q, k, v, scale).double() - expected).abs().max().item()
    assert error <= max(2 * sdpa_error, 1e-2), (error, sdpa_error)
    # The first token attends only to itself: its output is its own value row, rounded.
    torch.testing.assert_close(out[0], v[0].repeat_interleave(group, 0), rtol=0, atol=0)


@pytest.mark.parametrize("dots", PATHS)
def test_peaked_scores_move_the_running_maximum(dots):
    # Large logits whose maximum keeps rising along the keys: every key block rescales the rows.
    q, k, v = _inputs(700, 3, 3, 64, seed=5, peak=4.0)
    ramp = torch.linspace(0.5, 3.0, 700).view(700, 1, 1).to(torch.bfloat16)
    k = (k * ramp).to(torch.bfloat16)
    out = cpu_flash_prefill.flash_prefill(q, k, v, 0.125, dots=dots)
    assert torch.isfinite(out.float()).all()
    expected = _reference(q, k, v, 0.125)
    sdpa_error = (_sdpa(q, k, v, 0.125).double() - expected).abs().max().item()
    assert (out.double() - expected).abs().max().item() <= max(2 * sdpa_error, 1e-2)


@pytest.mark.parametrize("dots", PATHS)
def test_contiguous_and_strided_inputs_agree(dots):
    q, k, v = _inputs(300, 3, 3, 64, seed=7)
    strided = cpu_flash_prefill.flash_prefill(q, k, v, 0.125, dots=dots)
    contiguous = cpu_flash_prefill.flash_prefill(q.contiguous(), k.contiguous(), v.contiguous(), 0.125, dots=dots)
    assert torch.equal(strided, contiguous)
    # A layout whose heads are not contiguous within a token is copied, not misread.
    q_heads_major = q.transpose(0, 1).contiguous().transpose(0, 1)
    assert torch.equal(cpu_flash_prefill.flash_prefill(q_heads_major, k, v, 0.125, dots=dots), strided)


def test_refuses_what_it_does_not_compute():
    q, k, v = _inputs(8, 2, 2, 64)
    with pytest.raises(RuntimeError, match="bf16"):
        cpu_flash_prefill.flash_prefill(q.float(), k.float(), v.float(), 0.125)
    with pytest.raises(RuntimeError, match="KVH dividing H"):
        cpu_flash_prefill.flash_prefill(q[:, :3], k, v, 0.125)
    assert not cpu_flash_prefill.supported(48) and not cpu_flash_prefill.supported(512)
