"""Bulk prefetch into L2 from inside a kernel (Hopper and later): weights a later kernel will
stream, asked for while the memory system would otherwise sit idle.

At batch-1 decode a layer alternates between kernels that stream weights at the copy rate and
kernels bound by dependent round trips (rope + KV write, the decode attention, the router), which
move almost nothing for microseconds. A latency-bound kernel can ask L2 for the weights of a
kernel after it (`cp.async.bulk.prefetch.L2`: fire and forget, no registers, no completion to wait
for); that kernel then reads them from L2 instead of device memory. Weights change only between
steps, so the prefetch may be issued before the kernel's dependent-launch wait (`pdl.py`).

Each program issues one bulk prefetch of its share of the range, from one thread: `THREADS` must
be the program's thread count (32 x num_warps), so that exactly one thread holds that lane. With
EVICT_LAST the lines carry L2's evict-last priority, for data that must outlive a stream read
with evict-first (the GEMVs read their weights so) before it is used.

No decode layer asks for a prefetch: in a Qwen3-30B-A3B layer on an H100, issued as one ~1 KB
request a thread, each use measured slower (`benchmarks/kernels/batch1_layer.py`, docs/perf.md).
The form here, one request a program, has compiled for sm_90 but not been timed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def supported(device: torch.device) -> bool:
    """Whether kernels on `device` can issue bulk L2 prefetches (a CUDA GPU of compute capability 9+)."""
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 9


def check_range(tensor: torch.Tensor) -> int:
    """The byte count of `tensor` as a prefetch range (contiguous, 16-byte aligned and sized)."""
    assert supported(tensor.device), "bulk L2 prefetches need a CUDA GPU of compute capability 9+"
    nbytes = tensor.numel() * tensor.element_size()
    assert tensor.is_contiguous() and tensor.data_ptr() % 16 == 0 and nbytes % 16 == 0, \
        "a bulk prefetch reads 16-byte aligned, 16-byte multiple ranges"
    return nbytes


@triton.jit
def prefetch_to_l2(base_ptr, nbytes, program, num_programs, THREADS: tl.constexpr, EVICT_LAST: tl.constexpr):
    """Ask L2 for this program's share of bytes [0, nbytes) at `base_ptr` (16-byte aligned, nbytes a
    multiple of 16), split evenly over `num_programs` programs of THREADS threads: one bulk
    prefetch a program, from its first thread."""
    lane = tl.arange(0, THREADS)
    piece = tl.cdiv(tl.cdiv(nbytes, num_programs), 16) * 16
    start = program.to(tl.int64) * piece + lane * 0
    size = tl.where(lane == 0, tl.minimum(tl.maximum(nbytes - start, 0), piece), 0).to(tl.int32)
    address = base_ptr.to(tl.pointer_type(tl.int8)) + start
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            .reg .b64 policy;
            setp.gt.s32 p, $2, 0;
            createpolicy.fractional.L2::evict_last.b64 policy, 1.0;
            @p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy;
            mov.u32 $0, 0;
            }""", "=r,l,r", [address, size], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise(
            """{
            .reg .pred p;
            setp.gt.s32 p, $2, 0;
            @p cp.async.bulk.prefetch.L2.global [$1], $2;
            mov.u32 $0, 0;
            }""", "=r,l,r", [address, size], dtype=tl.int32, is_pure=False, pack=1)
