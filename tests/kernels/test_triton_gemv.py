"""The batch-1 Triton GEMV (used inside decode CUDA graphs) against `F.linear` (the torch_native
path) on random inputs.

GPU only (skipped without CUDA): the kernel is autotuned, which needs a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

if INTERPRET:
    pytest.skip("autotuning needs a GPU", allow_module_level=True)

from tokenmill.model.layers.triton_gemv import gemv  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336), (1000, 576), (37, 300), (151936, 1024), (8, 64)])
def test_gemv_matches_linear(n, k, dtype):
    torch.manual_seed(n + k)
    w = torch.randn(n, k, dtype=dtype, device=DEVICE) * 0.05
    x = torch.randn(1, k, dtype=dtype, device=DEVICE)
    ref = F.linear(x.float(), w.float())
    out = gemv(x, w)
    assert out.shape == (1, n) and out.dtype == dtype
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel


def test_gemv_on_a_weight_shard_view():
    """A row-parallel shard is a view with its own row stride; the kernel must honour it."""
    full = torch.randn(512, 2048, dtype=torch.bfloat16, device=DEVICE)
    shard = full[100:356]  # rows of a larger matrix: stride(0) == 2048, contiguous rows
    x = torch.randn(1, 2048, dtype=torch.bfloat16, device=DEVICE)
    ref = F.linear(x.float(), shard.float())
    assert ((gemv(x, shard).float() - ref).norm() / ref.norm()).item() < 1e-2
