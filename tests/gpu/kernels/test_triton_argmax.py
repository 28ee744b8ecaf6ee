"""The sampler's Triton row-wise argmax against `torch.argmax(x, dim=-1)`, index for index.

GPU only (skipped without CUDA); `TRITON_INTERPRET=1` also runs it on the CPU interpreter, with
fewer and narrower rows (the interpreter runs Python per program).
"""

from __future__ import annotations

import pytest
import torch

# Imported first: skips the module without a GPU (or without Triton).
from kernel_device import DEVICE, INTERPRET

from tokenmill.ops.argmax import _BLOCK, _CHUNK, argmax_rows

NAN, INF = float("nan"), float("inf")

# Widths: below one block, not a multiple of the block or the chunk, exactly one chunk, one past
# it, and (on the GPU) the Llama-3 and Qwen vocabularies.
WIDTHS = [1, 100, _BLOCK + 3, _CHUNK, _CHUNK + 1, 3 * _CHUNK - 7]
WIDTHS += [] if INTERPRET else [32000, 128256, 151936]
ROWS = [1, 3] if INTERPRET else [1, 3, 64]
TIE_WIDTH = 3 * _CHUNK + 5 if INTERPRET else 128256


def check(x: torch.Tensor) -> None:
    got = argmax_rows(x)
    want = torch.argmax(x, dim=-1)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.cpu(), want.cpu()), (got.tolist(), want.tolist())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("rows", ROWS)
def test_random(rows, width):
    check(torch.randn(rows, width, device=DEVICE) * 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes(dtype):
    # bf16 has few mantissa bits: ties between rounded values come up by themselves here.
    check((torch.randn(3, 2 * _CHUNK + 17, device=DEVICE) * 5).to(dtype))
    check(torch.randint(-3, 3, (3, 2 * _CHUNK + 17), device=DEVICE).to(dtype))


def test_non_contiguous_rows():
    # A row stride larger than the width (a view of a wider buffer).
    check((torch.randn(3, _CHUNK + 40, device=DEVICE) * 5)[:, : _CHUNK + 9])


def test_ties_smallest_index_wins():
    x = torch.randn(4, TIE_WIDTH, device=DEVICE)
    # Row 0: equal maxima in different chunks (the earliest chunk must win).
    x[0, [_CHUNK + 5, 2 * _CHUNK + 1, TIE_WIDTH - 1]] = 10.0
    # Row 1: equal maxima inside one chunk, in different lanes and in the same lane (same offset
    # in different BLOCK steps) of the chunk's loop.
    x[1, [_BLOCK + 7, 3, _BLOCK + 3, 2 * _BLOCK + 3, _CHUNK + 1]] = 10.0
    # Row 2: every element equal.
    x[2] = 1.5
    # Row 3: only small integers, so ties everywhere.
    x[3] = torch.randint(0, 4, (TIE_WIDTH,), device=DEVICE).float()
    check(x)


def test_signed_zeros_are_equal():
    # torch compares -0.0 == +0.0: the first zero wins whatever its sign.
    x = torch.full((2, _CHUNK + 10), -1.0, device=DEVICE)
    x[0, [5, _CHUNK + 2]] = torch.tensor([-0.0, 0.0], device=DEVICE)
    x[1, [7, 9]] = torch.tensor([0.0, -0.0], device=DEVICE)
    check(x)


def test_nan_wins_first_nan():
    x = torch.randn(4, 2 * _CHUNK + 3, device=DEVICE)
    x[0, [_CHUNK + 4, 9, 2 * _CHUNK]] = NAN  # first NaN at 9, ahead of the later ones
    x[1, [_CHUNK + 4, 0]] = torch.tensor([NAN, INF], device=DEVICE)  # NaN beats +inf
    x[2, 2 * _CHUNK + 2] = NAN  # the very last element
    x[3, :] = NAN
    # A negative NaN (sign bit set) counts as a NaN too.
    neg_nan = torch.tensor([NAN], device=DEVICE).view(torch.int32) | torch.tensor([-2**31], dtype=torch.int32,
                                                                                   device=DEVICE)
    x[2, 17] = neg_nan.view(torch.float32)[0]
    check(x)


def test_infinities():
    x = torch.randn(4, 2 * _CHUNK + 3, device=DEVICE)
    x[0, [_CHUNK + 1, 2 * _CHUNK + 1]] = INF
    x[1] = -INF  # all -inf: index 0
    x[2] = -INF
    x[2, _CHUNK + 6] = -3.0e38
    x[3, :7] = -INF
    x[3, 7:] = -1.0e-45  # the smallest negative denormal, above -inf and below 0
    x[3, 1234] = 1.0e-45
    check(x)


def test_empty_batch():
    assert argmax_rows(torch.randn(0, 100, device=DEVICE)).shape == (0,)
