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


def _patch_interpreter_fp8_rounding() -> None:
    """Triton's interpreter (3.9) rounds float -> e4m3 without carrying a mantissa overflow into the
    exponent (1.97 becomes 1.0, not 2.0), which no GPU does. Under the interpreter, conversions to
    e4m3 go through torch's (round to nearest even, saturating at +-448 as the GPU's
    `cvt.rn.satfinite`), so the tests check the kernels' arithmetic, not the interpreter's
    converter. Conversions from e4m3 are exact there."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._convert_float
    torch_of = {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16}

    def convert(data, input_dtype, output_dtype, rounding_mode):
        if output_dtype == tl.float8e4nv and input_dtype in torch_of:
            bits = torch.from_numpy(np.ascontiguousarray(data).view(
                {4: np.int32, 2: np.int16}[input_dtype.primitive_bitwidth // 8]).copy())
            values = bits.view(torch_of[input_dtype])
            return values.float().clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8).numpy().reshape(data.shape)
        return original(data, input_dtype, output_dtype, rounding_mode)

    interpreter._convert_float = convert


if INTERPRET:
    _patch_interpreter_fp8_rounding()


class CountLaunches:
    """Stands in for a Triton kernel (monkeypatched over it) and counts its launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]
