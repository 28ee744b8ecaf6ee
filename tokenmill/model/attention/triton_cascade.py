"""Cascade attention: a decode batch whose requests all start with the same KV blocks.

With prefix caching, the requests of a batch often share their first blocks: one system prompt
or document before different questions, or the prompt of `n > 1` samples. The plain decode kernel
reads those blocks once per request. At 128 requests of ~2k tokens sharing 1,536 (the prefix
benchmark at 75% hit, H200) it takes 190 us a layer, against 80 us to read each distinct block
once: the copies come from L2, whose bandwidth is then the limit (docs/perf.md, ninth session).

Cascade attention splits each context in two, in one launch of the decode kernel's cascade form
(`_paged_decode_kernel` with CASCADE, triton_decode.py):

1. Prefix programs (`_shared_prefix_program`, first in the grid) attend the queries of many
   requests to the shared prefix at once. One takes a KV head and a chunk of requests, all their
   query heads of that KV head as the rows of one tile (64 rows: 16 requests at group 4), so each
   prefix tile is read once per chunk and feeds tensor-core dots 64 rows tall, where the decode
   program has its group padded to 16. The prefix is cut into `num_prefix_splits` ranges, a
   program each, for parallelism; each writes its normalised partial output and log-sum-exp into
   its lane of every request of the chunk.
2. Request programs attend each request over the rest of its context and write the last lane.

Every program then counts itself in on the request's counter, and the last of a request's lanes
merges them (log-sum-exp weights), as the split-KV merge does. Nobody waits for anybody, so the
compute-bound prefix programs run beside the memory-bound request programs.

The prefix length lives on the device (one int32), so a CUDA graph captured once serves every
length; at 0 the prefix programs return at once and each request program writes its output
directly. The result equals plain decode up to float rounding. The caller guarantees that the
first `prefix_len` tokens of every request in the batch sit in the same blocks as row 0's
(`common_prefix_len` in the model runner), and that each request has a token past them.
"""

from __future__ import annotations

import torch
import triton

from tokenmill.model.attention.triton_decode import (
    DECODE_CONFIG,
    KernelConfig,
    _num_sms,
    launch_decode_kernel,
    new_partials,
    new_split_counters,
)

# Rows of a prefix program's tile (whole groups of query heads).
PREFIX_BLOCK_M = 64
# Prefix lanes at most: with the request program's own lane, 8 lanes, the decode kernel's narrow
# merge width (one compiled variant for every lane count).
MAX_PREFIX_SPLITS = 7


def prefix_num_splits(num_decodes: int, num_kv_heads: int, group: int, device: torch.device) -> int:
    """Prefix ranges per (request chunk, KV head): about two programs per SM (two fit at once),
    at most MAX_PREFIX_SPLITS. Measured on an H200 at Llama-3.1-8B shapes, 1,536 shared tokens
    (docs/perf.md): at 128 requests (64 chunk programs) 1-7 splits took 130/113/109/107/115/116/
    116 us, this gives 4; at 64 requests 88/71/65/63/62/62/63, this gives 7."""
    if device.type == "cuda":
        num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    else:
        num_sms = 16  # Triton's CPU interpreter: any value is correct
    block_m, reqs = _chunk_shape(group)
    programs = triton.cdiv(num_decodes, reqs) * num_kv_heads
    return max(1, min(MAX_PREFIX_SPLITS, 2 * num_sms // programs))


def _chunk_shape(group: int, block_m: int = PREFIX_BLOCK_M) -> tuple[int, int]:
    """(rows, requests) of a prefix program's tile: `block_m` rows of whole groups (one request
    for groups wider than that)."""
    block_m = max(block_m, triton.next_power_of_2(group))
    return block_m, block_m // group


def cascade_decode(
    q: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_table: torch.Tensor,  # [>= num_decodes, max_blocks] int32
    seq_lens: torch.Tensor,  # [>= num_decodes] int32
    prefix_len: torch.Tensor,  # [1] int32 on the device: tokens shared by every row (0: none)
    out: torch.Tensor,  # [num_decodes, num_heads, head_dim]
    scale: float,
    num_prefix_splits: int | None = None,
    split_counters: torch.Tensor | None = None,  # [>= num_decodes * num_kv_heads] int32, all 0
    config: KernelConfig = DECODE_CONFIG,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    prefix_block_m: int = PREFIX_BLOCK_M,
    prefix_programs_first: bool = True,
) -> None:
    """Decode attention with the shared prefix attended once for all requests (module docstring).
    Host ints only: graph-capturable. The counters are left at zero, as `paged_decode` leaves them.
    `prefix_programs_first=False` puts the prefix programs after the requests' in the grid, which
    the tests use to make them the last to arrive under Triton's interpreter (programs in order)."""
    num_decodes, num_heads, _ = q.shape
    if num_decodes == 0:
        return
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_prefix_splits is None:
        num_prefix_splits = prefix_num_splits(num_decodes, num_kv_heads, group, q.device)
    assert 1 <= num_prefix_splits <= MAX_PREFIX_SPLITS
    assert prefix_len.dtype == torch.int32 and prefix_len.numel() == 1
    if split_counters is None:
        split_counters = new_split_counters(num_decodes * num_kv_heads, q.device)
    assert split_counters.numel() >= num_decodes * num_kv_heads and split_counters.dtype == torch.int32
    num_lanes = num_prefix_splits + 1
    part_out, part_lse = new_partials(num_decodes, num_heads, num_lanes, q)
    block_m, reqs = _chunk_shape(group, prefix_block_m)
    launch_decode_kernel(q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse, split_counters,
                         num_lanes, scale, config, k_scale, v_scale, prefix_len=prefix_len,
                         prefix_chunk=(block_m, reqs),
                         num_prefix_programs=triton.cdiv(num_decodes, reqs) * num_prefix_splits,
                         prefix_programs_first=prefix_programs_first)
