"""Does this torch's cuBLAS fp8 GEMM take DeepSeek's block scales, and how fast is it?

    python3 -m tokenmill.benchmarks.kernels.scaled_mm_blockwise

Quantises a 2048 x 4096 activation per 1 x 128 group and a 4096 x 4096 weight per 128 x 128 block
(the block-FP8 checkpoints' format), then tries the scale layouts `torch._scaled_mm` and
`torch.nn.functional.scaled_mm` might accept, each against the float32 product of the dequantised
operands (largest error relative to the largest output) with its TFLOP/s over 50 calls. Which
layouts pass tells a block-FP8 linear how to call cuBLAS instead of `ops/fp8_gemm.py`.
"""

from __future__ import annotations

import time

import torch

M, N, K = 2048, 4096, 4096


def quantise(x: torch.Tensor, block_rows: int, block_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 values and one float32 scale per block_rows x block_cols block."""
    rows, cols = x.shape
    blocks = x.view(rows // block_rows, block_rows, cols // block_cols, block_cols)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-6) / 448
    values = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows, cols)
    return values, scale.float()


def dequantise(values: torch.Tensor, scale: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    rows = values.shape[0]
    blocks = values.float().view(rows // block_rows, block_rows, -1, block_cols)
    return (blocks * scale[:, None, :, None]).view(values.shape)


def main() -> None:
    torch.manual_seed(0)
    a = torch.randn(M, K, device="cuda")
    w = torch.randn(N, K, device="cuda")
    aq, sa = quantise(a, 1, 128)  # sa [M, K/128]
    wq, sw = quantise(w, 128, 128)  # sw [N/128, K/128]
    ref = dequantise(aq, sa, 1, 128) @ dequantise(wq, sw, 128, 128).t()
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())
    sa_col = sa.t().contiguous().t()  # [M, K/128] with the M axis contiguous
    tries = {
        "sa MxK/128 col-major, sw.t() K/128xN/128": lambda: torch._scaled_mm(aq, wq.t(), sa_col, sw.t(),
                                                                              out_dtype=torch.bfloat16),
        "sa contiguous, sw.t()": lambda: torch._scaled_mm(aq, wq.t(), sa, sw.t(), out_dtype=torch.bfloat16),
        "sa col-major, sw": lambda: torch._scaled_mm(aq, wq.t(), sa_col, sw, out_dtype=torch.bfloat16),
        "sa col-major, sw.t().contiguous()": lambda: torch._scaled_mm(aq, wq.t(), sa_col, sw.t().contiguous(),
                                                                       out_dtype=torch.bfloat16),
    }
    try:
        from torch.nn.functional import ScalingType, scaled_mm
        tries["F.scaled_mm BlockWise1x128/128x128"] = lambda: scaled_mm(
            aq, wq.t(), sa_col, ScalingType.BlockWise1x128, sw.t(), ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16)
        tries["F.scaled_mm BlockWise1x128/128x128 contiguous sw"] = lambda: scaled_mm(
            aq, wq.t(), sa_col, ScalingType.BlockWise1x128, sw, ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16)
    except ImportError as e:
        print("no torch.nn.functional.scaled_mm:", e)
    for name, fn in tries.items():
        try:
            out = fn().float()
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / 50
            print(f"OK   {name}: rel max err {err:.2e}, {2 * M * N * K / seconds / 1e12:.0f} TFLOP/s")
        except Exception as e:  # noqa: BLE001 - each refused layout is a finding, printed
            print(f"FAIL {name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")


if __name__ == "__main__":
    main()
