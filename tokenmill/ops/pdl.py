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

A kernel may instead release first (the ops' `release_first`): its dependents launch once all its
programs have started, so the kernel after it may run while the one before it still does. That
is safe where the kernel after it reads nothing but weights before its wait: true after every
kernel of the batch-1 decode chain but the experts' gate/up one (the down GEMV after it reads the
routing before its wait). It can pay where a kernel that streams weights follows latency-bound
ones: the O projection's GEMV may start reading its rows while rope + KV write and the decode
attention, a few microseconds each of dependent round trips, leave the memory system idle (the
other way to use that idle time: the attention kernel asks L2 for those rows, `l2_prefetch.py`).
The decode layers do not ask for it: in a Qwen3-30B-A3B layer on an H100 it measured slower
(`benchmarks/kernels/batch1_layer.py`, docs/perf.md).

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
def pdl_enter(PDL: tl.constexpr, RELEASE_FIRST: tl.constexpr = False):
    """With PDL: wait until the kernel before has finished and its writes are visible, then allow
    the next kernel to launch (it is placed as this one's programs leave the SMs). RELEASE_FIRST
    allows it before waiting (see the module's docstring for when that is safe)."""
    if PDL:
        if RELEASE_FIRST:
            tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()
        if not RELEASE_FIRST:
            tl.extra.cuda.gdc_launch_dependents()
