"""The CPU greedy-pick kernel (`ops/cpu_argmax.cpp`) against torch.argmax, index for index: rows of
every length around the vector width, equal maxima within one vector and across vectors (the first
wins), NaN (the first NaN wins, as in torch), rows of -inf and +inf, rows with a stride, and the
inputs it leaves to torch.argmax. Built as in the engine (a C++ compiler and ninja, which CI has)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.ops import cpu_argmax
from tokenmill.worker.sampler import Sampler

pytestmark = pytest.mark.skipif(not cpu_argmax.available(), reason="no C++ toolchain to build the kernel")


def _check(logits: torch.Tensor) -> None:
    assert torch.equal(cpu_argmax.argmax(logits), logits.argmax(dim=-1))


@pytest.mark.parametrize("vocab", [1, 7, 15, 16, 17, 33, 49152, 49157])
def test_random_rows(vocab):
    gen = torch.Generator().manual_seed(vocab)
    _check(torch.randn(5, vocab, generator=gen))


def test_equal_maxima_take_the_first():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(0))
    logits[0, [3, 9]] = 50.0  # one vector
    logits[1, [5, 40, 99]] = 50.0  # across vectors and in the tail
    logits[2, [98, 99]] = 50.0  # only in the tail
    logits[3] = 2.0  # every element equal
    logits[4, [0, 64]] = 50.0
    logits[5, [17, 16]] = 50.0
    _check(logits)
    assert cpu_argmax.argmax(logits).tolist()[:4] == [3, 5, 98, 0]


def test_nan_infinities_and_strided_rows():
    logits = torch.randn(6, 70, generator=torch.Generator().manual_seed(1))
    logits[0, 20] = float("nan")
    logits[1, [66, 30]] = float("nan")  # the first NaN, after a larger value
    logits[1, 10] = 1e30
    logits[2] = float("-inf")  # a fully masked row
    logits[3, [4, 50]] = float("inf")
    logits[4, 69] = float("nan")  # in the tail
    _check(logits)
    wide = torch.randn(4, 200, generator=torch.Generator().manual_seed(2))
    _check(wide[:, 3:150])  # rows 200 apart, unit stride within
    assert cpu_argmax.argmax(wide[:, 3:150]).tolist() == wide[:, 3:150].argmax(-1).tolist()


def test_other_inputs_fall_back_to_torch():
    gen = torch.Generator().manual_seed(3)
    _check(torch.randn(40, 3, generator=gen).t())  # columns: stride(1) != 1
    _check(torch.randn(3, 50, generator=gen).bfloat16())


def test_sampler_takes_it_when_asked():
    assert Sampler(native_argmax=True).argmax is cpu_argmax.argmax
    assert Sampler().argmax is not cpu_argmax.argmax
