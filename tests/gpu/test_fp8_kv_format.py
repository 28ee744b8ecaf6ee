"""The fp8 KV-cache format against HF, on the CPU with the reference backend (`torch_native`).

Runs in CI. It pins down what the GPU test `test_gpu_model.py::test_fp8_kv_cache_follows_hf_on_its_
own_greedy_path` may expect: an fp8 engine follows HF whose K and V are rounded the same way
(`gpu_models.hf_with_fp8_kv`), not plain bf16 HF, which even this reference path misses by
nats per token on peaky random weights.
"""

from __future__ import annotations

import pytest
import torch

from gpu_models import fp8_logprob_gaps, hf_folder

if getattr(torch, "float8_e4m3fn", None) is None:
    pytest.skip("this torch has no float8_e4m3fn", allow_module_level=True)


def test_reference_fp8_engine_follows_fp8_rounded_hf(tmp_path_factory):
    folder, hf = hf_folder(tmp_path_factory, "llama", 0.5, device="cpu")
    gaps = fp8_logprob_gaps(folder, hf, "cpu")
    assert len(gaps) == 72
    # Measured 0.36 (2026-11-22); against plain bf16 HF the same tokens are 4.6 nats off.
    assert sum(gaps) / len(gaps) < 1.0, sorted(gaps)[-5:]
