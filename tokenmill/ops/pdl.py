"""Programmatic dependent launch (PDL, Hopper and later): a kernel starts before the one ahead of
it in the stream has finished.

At batch-1 decode a step is a chain of ~270 short kernels (GEMVs of 5-40 us, norms, rope and
attention of ~2-6 us), each of which, launched the ordinary way, starts only once the one before
has drained and flushed its writes: its launch and its first loads are on the critical path every
time. A kernel launched with `launch_pdl=True` may be scheduled as soon as every program of the
kernel before it has called `griddepcontrol.launch_dependents` (or exited); it must then execute
`griddepcontrol.wait` before it reads anything that kernel wrote or writes anything it may still
read. CUDA graph capture keeps the relation (a programmatic edge), so the decode graphs get it.

The kernels of the decode chain that take a `PDL` flag call `pdl_enter(PDL)` first thing (the
GEMVs after reading their first weight tile: weights change only between steps): wait for the kernel
before, then let the next one launch. Waiting before releasing keeps the ordering transitive: a
kernel can only have started once the kernel before it has passed its wait, so everything two or
more kernels back has finished, and may be read before the wait (the MoE down GEMV reads the
routing so, `fused_moe_gemv.py`); a kernel launched the ordinary way may sit anywhere in the chain.

Releasing first instead (the next kernel launched before this one waits, so that a GEMV's weight
reads overlap latency-bound kernels such as rope and attention) measured slower in a Qwen3-30B-A3B
layer on an H100: 61.2 against 58.5 us (`benchmarks/kernels/batch1_layer.py`, docs/perf.md).

Layers decide once, when they are built (`BuildContext.pdl`: `KernelConfig.pdl`, `--pdl`, and
`supported` here), and pass the choice to the ops as their `pdl` argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def supported(device: torch.device) -> bool:
    """Whether kernels on `device` can be launched dependent (a CUDA GPU of compute capability 9+)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool) -> dict:
    """The launch option a dependent launch needs; none otherwise (a Triton backend without PDL,
    such as the CPU interpreter, never sees the option)."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL: wait until the kernel before has finished and its writes are visible, then allow
    the next kernel to launch (it is placed as this one's programs leave the SMs)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
