"""Where the Triton kernel tests run: the GPU, or the CPU under `TRITON_INTERPRET=1` (Triton's
interpreter, for checking kernels without a GPU). Anywhere else the importing test module is skipped."""

import os

import pytest
import torch

pytest.importorskip("triton")

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if torch.cuda.is_available():
    DEVICE = torch.device("cuda")
elif INTERPRET:
    DEVICE = torch.device("cpu")
else:
    pytest.skip("Triton kernels need CUDA (or TRITON_INTERPRET=1)", allow_module_level=True)
