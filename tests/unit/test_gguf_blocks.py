"""GGUF blocks kept quantised (ops/gguf_blocks.py): the float reference matches the `gguf`
library's dequantisation bit for bit, and the CPU kernels' products match products with it."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from tokenmill.ops import gguf_blocks


def _gguf_rows(kind: str, out_features: int = 48, in_features: int = 96, seed: int = 0):
    """(raw uint8 rows, float32 weights as the gguf library dequantises them)."""
    rng = np.random.default_rng(seed)
    # Rows of different magnitudes, so Q8_0's per-row requantisation sees varied block scales.
    weights = (rng.standard_normal((out_features, in_features)) *
               rng.uniform(0.01, 2.0, (out_features, 1))).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[kind]
    raw = gguf.quants.quantize(weights, qtype)
    ref = np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32).reshape(out_features, in_features)
    return torch.from_numpy(np.ascontiguousarray(raw)), torch.from_numpy(ref)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantize_matches_gguf_library(kind):
    raw, ref = _gguf_rows(kind)
    assert raw.shape[1] == 96 // 32 * gguf_blocks.BLOCK_BYTES[kind]
    assert torch.equal(gguf_blocks.dequantize(raw, kind), ref)


def test_dequantize_matches_gguf_library_on_the_shipped_file(default_gguf_path):
    reader = gguf.GGUFReader(default_gguf_path)
    seen = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind not in gguf_blocks.BLOCK_BYTES or kind in seen:
            continue
        seen.add(kind)
        raw = torch.from_numpy(np.array(tensor.data))
        ref = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        assert torch.equal(gguf_blocks.dequantize(raw, kind), torch.from_numpy(ref).reshape(raw.shape[0], -1))
    assert seen == {"Q4_1", "Q8_0"}


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_int4_kernel_matches_dequantised_product(kind, tokens):
    raw, ref = _gguf_rows(kind)
    x = torch.randn(tokens, ref.shape[1])
    packed, scales_zeros = gguf_blocks.pack_int4(raw, kind, torch.float32)
    out = gguf_blocks.int4_linear(x, packed, scales_zeros)
    torch.testing.assert_close(out, x @ ref.t(), rtol=1e-4, atol=1e-4)
    # bf16 activations: scale and zero rounded to bf16, products accumulated in float32
    packed, scales_zeros = gguf_blocks.pack_int4(raw, kind, torch.bfloat16)
    out = gguf_blocks.int4_linear(x.bfloat16(), packed, scales_zeros).float()
    expected = x.bfloat16().float() @ ref.t()
    assert (out - expected).abs().max() <= 0.02 * expected.abs().max()


@pytest.mark.parametrize("tokens", [1, 7])
def test_int8_kernel_is_within_a_row_step_of_q8_0(tokens):
    raw, ref = _gguf_rows("Q8_0")
    x = torch.randn(tokens, ref.shape[1])
    weight, scales = gguf_blocks.pack_int8(raw, torch.float32)
    requantised = weight.float() * scales[:, None]
    # Each weight moves by at most half a step of its row's scale.
    assert ((requantised - ref).abs() <= scales[:, None] / 2 + 1e-6).all()
    torch.testing.assert_close(gguf_blocks.int8_linear(x, weight, scales), x @ requantised.t(), rtol=1e-4, atol=1e-4)


def test_unsupported_block_type_is_refused():
    with pytest.raises(ValueError, match="Q6_K"):
        gguf_blocks.dequantize(torch.zeros(1, 210, dtype=torch.uint8), "Q6_K")
