"""`ops/l2_prefetch.py` off the GPU: the bulk prefetch is Hopper's, so a CPU tensor is never a
prefetch range (the kernels that take one are tested on the device, `tests/gpu/kernels/test_pdl.py`)."""

import pytest
import torch

from tokenmill.ops import l2_prefetch


def test_only_hopper_gpus_prefetch():
    assert not l2_prefetch.supported(torch.device("cpu"))


def test_a_cpu_tensor_is_refused_as_a_range():
    with pytest.raises(AssertionError, match="compute capability 9"):
        l2_prefetch.check_range(torch.zeros(64, dtype=torch.bfloat16))
