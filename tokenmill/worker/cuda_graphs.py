"""CUDA graphs for decode-only steps.

The device's CPU is slow to launch kernels (~20 us each) and a decode step of an 8B model is a few
hundred small kernels, so eager decode is launch-bound. The model forward plus the LM head is
captured once per batch size of a ladder (1, 2, 4, 8, 16, 32, ... up to `max_num_seqs`); a step
pads its batch up to the next captured size and replays. The graphs read persistent device
buffers, which each step fills from pinned host twins with one async copy per buffer. There are two
twins per buffer, used in turn: under async scheduling the host writes step N+1's inputs while step
N's copies may still wait in the stream.

Padded rows have `seq_len = 0` (the decode kernel writes zeros for them) and slot -1 (no KV write);
their logits are sliced away.

With `cascade_min_batch`, a second, sparser ladder (powers of two from there, and the largest
size) is captured with cascade attention (`model/attention/triton_cascade.py`), reading the
shared prefix's length from one more device buffer; a step whose decodes share a prefix
(`common_prefix_len > 0`) pads up to the next of those sizes and replays that graph. Sparser,
because every capture adds start-up time, and padding costs a large decode batch little (its
GEMMs are bound by reading the weights; padded rows have no context to attend). Both ladders
share one memory pool, and a step replays exactly one graph.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch

from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.layers.matmul import decode_graph_kernels

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class _PinnedBuffer:
    """A device tensor and two pinned host twins (with numpy views written in place)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.device_tensor = torch.zeros(shape, dtype=dtype, device=device)
        self.hosts = [torch.zeros(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
        self.nps = [h.numpy() for h in self.hosts]


class CudaGraphDecoder:
    def __init__(self, model: torch.nn.Module, kv_caches: list, max_batch: int, max_model_len: int,
                 block_size: int, device: torch.device, cascade_min_batch: int | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.device = device
        self.max_model_len = max_model_len
        self.sizes = batch_size_ladder(max_batch)
        max_blocks = -(-max_model_len // block_size)
        self.input_ids = _PinnedBuffer((max_batch,), torch.long, device)
        self.positions = _PinnedBuffer((max_batch,), torch.long, device)
        self.slot_mapping = _PinnedBuffer((max_batch,), torch.long, device)
        self.seq_lens = _PinnedBuffer((max_batch,), torch.int32, device)
        self.block_table = _PinnedBuffer((max_batch, max_blocks), torch.int32, device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        self.prefix_len = _PinnedBuffer((1,), torch.int32, device)
        self.cascade_sizes = [] if cascade_min_batch is None else [
            s for s in self.sizes if s >= cascade_min_batch and (s & (s - 1) == 0 or s == self.sizes[-1])]
        # Keyed (batch, cascade).
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.pool = None
        self._turn = 0  # which host twin this step writes

    def _meta(self, batch: int, cascade: bool) -> AttentionMetadata:
        return AttentionMetadata(
            num_reqs=batch, num_tokens=batch, num_decodes=batch, max_query_len=1,
            max_seq_len=self.max_model_len,  # sizes the split count; kernels read the real lengths
            query_start_loc=self.query_start_loc[:batch + 1], seq_lens=self.seq_lens.device_tensor[:batch],
            block_table=self.block_table.device_tensor[:batch],
            slot_mapping=self.slot_mapping.device_tensor[:batch],
            common_prefix_len=self.prefix_len.device_tensor if cascade else None)

    def _forward(self, batch: int, cascade: bool) -> torch.Tensor:
        hidden = self.model(self.input_ids.device_tensor[:batch], self.positions.device_tensor[:batch],
                            self.kv_caches, self._meta(batch, cascade))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        self.slot_mapping.device_tensor.fill_(-1)  # capture and warm-up write no KV
        self.seq_lens.device_tensor.zero_()
        self.prefix_len.device_tensor.zero_()
        started = time.perf_counter()
        variants = [(b, False) for b in self.sizes] + [(b, True) for b in self.cascade_sizes]
        for key in sorted(variants, reverse=True):
            with decode_graph_kernels():  # (batch 1: the Triton GEMV instead of cuBLAS)
                self._forward(*key)  # warm-up: Triton compiles, buffers get allocated outside the graph
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    self.logits[key] = self._forward(*key)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[key] = graph
        torch.cuda.synchronize()
        logger.info("captured CUDA graphs for decode batch sizes %s%s in %.1f s", self.sizes,
                    f", with cascade attention for {self.cascade_sizes}" if self.cascade_sizes else "",
                    time.perf_counter() - started)

    def can_run(self, num_reqs: int) -> bool:
        return bool(self.graphs) and num_reqs <= self.sizes[-1]

    def run(self, input_ids: np.ndarray, positions: np.ndarray, slot_mapping: np.ndarray,
            seq_lens: np.ndarray, block_table: np.ndarray,
            device_tokens: tuple[torch.Tensor, torch.Tensor] | None = None,
            common_prefix_len: int = 0) -> torch.Tensor:
        """Replay for a decode batch of len(input_ids) requests; returns their logits [n, vocab].

        `device_tokens` = (rows, token ids), both on the device: input ids the host does not know
        yet (the previous step's samples, async scheduling), written over `input_ids` at `rows`.
        `common_prefix_len` > 0 (tokens every request has in row 0's blocks, see
        worker/common_prefix.py) replays a cascade graph, for batches from the smallest such size.
        """
        n = len(input_ids)
        cascade = common_prefix_len > 0 and bool(self.cascade_sizes) and self.cascade_sizes[0] <= n
        sizes = self.cascade_sizes if cascade else self.sizes
        batch = sizes[bisect.bisect_left(sizes, n)]
        turn = self._turn
        self._turn ^= 1
        fills = ((self.input_ids, input_ids, 0), (self.positions, positions, 0),
                 (self.slot_mapping, slot_mapping, -1), (self.seq_lens, seq_lens, 0))
        for buf, values, pad in fills:
            host = buf.nps[turn]
            host[:n] = values
            host[n:batch] = pad
            buf.device_tensor[:batch].copy_(buf.hosts[turn][:batch], non_blocking=True)
        if cascade:
            self.prefix_len.nps[turn][0] = common_prefix_len
            self.prefix_len.device_tensor.copy_(self.prefix_len.hosts[turn], non_blocking=True)
        num_blocks = block_table.shape[1]
        table = self.block_table.nps[turn]
        table[:n, :num_blocks] = block_table
        table[n:batch, :num_blocks] = 0
        self.block_table.device_tensor[:batch, :num_blocks].copy_(
            self.block_table.hosts[turn][:batch, :num_blocks], non_blocking=True)
        if device_tokens is not None:
            self.input_ids.device_tensor.index_copy_(0, *device_tokens)
        self.graphs[batch, cascade].replay()
        return self.logits[batch, cascade][:n]
