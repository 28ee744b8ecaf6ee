"""CUDA graphs for decode-only steps.

The device's CPU is slow to launch kernels (~20 us each) and a decode step of an 8B model is a few
hundred small kernels, so eager decode is launch-bound. The model forward plus the LM head is
captured once per batch size of a ladder (1, 2, 4, 8, 16, 32, ... up to `max_num_seqs`); a step
pads its batch up to the next captured size and replays. The graphs read the runner's persistent
input buffers (`input_batch.InputBuffers`), which each step stages its inputs into; padded rows
have `seq_len = 0` (the decode kernel writes zeros for them) and slot -1 (no KV write), and their
logits are sliced away.

Where the attention backend decides cascade attention (its builder's `cascade_min_decodes`), a
second, sparser ladder (powers of two from there, and the largest size) is captured with the
backend's cascade metadata; a step whose builder found a shared prefix pads up to the next of
those sizes and replays that graph. Sparser, because every capture adds start-up time, and padding
costs a large decode batch little (its GEMMs are bound by reading the weights; padded rows have no
context to attend). Both ladders share one memory pool, and a step replays exactly one graph.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from tokenmill.distributed.parallel_state import TensorParallelGroup
from tokenmill.model.attention.backend import AttentionMetadataBuilder
from tokenmill.model.forward_context import ForwardContext, forward_context
from tokenmill.worker.input_buffers import InputBuffers

logger = logging.getLogger(__name__)

_GRAPH_CONTEXT = ForwardContext(decode_graph=True)


def batch_size_ladder(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted(set(sizes + [max_batch]))


class CudaGraphDecoder:
    def __init__(self, model: torch.nn.Module, kv_caches: list, buffers: InputBuffers,
                 builder: AttentionMetadataBuilder, max_batch: int, max_model_len: int,
                 tp: TensorParallelGroup, cascade_min_batch: int | None = None) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.builder = builder
        self.max_model_len = max_model_len
        self.tp = tp
        self.sizes = batch_size_ladder(max_batch)
        self.cascade_sizes = [] if cascade_min_batch is None else [
            s for s in self.sizes if s >= cascade_min_batch and (s & (s - 1) == 0 or s == self.sizes[-1])]
        # Keyed (batch, cascade).
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.logits: dict[tuple[int, bool], torch.Tensor] = {}
        self.pool = None

    def _forward(self, batch: int, cascade: bool) -> torch.Tensor:
        staged = self.buffers.capture_views(batch)
        meta = self.builder.build_for_capture(staged.batch, cascade, self.max_model_len)
        hidden = self.model(staged.input_ids, staged.positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every size, largest first, sharing one memory pool."""
        started = time.perf_counter()
        self.buffers.prepare_for_capture(self.sizes[-1])
        variants = [(b, False) for b in self.sizes] + [(b, True) for b in self.cascade_sizes]
        comm = self.tp.communicator
        for key in sorted(variants, reverse=True):
            with forward_context(_GRAPH_CONTEXT):
                slot = comm.next_slot if comm is not None else None
                self._forward(*key)  # warm-up: Triton compiles and autotunes, buffers get allocated outside the graph
                self.tp.check_all_sums_taken()
                # A replay repeats the captured slot sequence, so a forward must leave the fused
                # all-reduce's alternation where it found it (distributed/symm_mem.py).
                assert comm is None or comm.next_slot == slot, "a forward pass made an odd number of fused sums"
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

    def padded_batch(self, num_decodes: int, cascade: bool) -> tuple[int, bool] | None:
        """The captured (size, cascade) graph a decode batch of `num_decodes` replays, or None.
        A cascade batch smaller than the smallest cascade graph replays a plain one."""
        if not self.graphs or num_decodes > self.sizes[-1]:
            return None
        cascade = cascade and bool(self.cascade_sizes) and self.cascade_sizes[0] <= num_decodes
        sizes = self.cascade_sizes if cascade else self.sizes
        return sizes[bisect.bisect_left(sizes, num_decodes)], cascade

    def replay(self, key: tuple[int, bool], num_decodes: int) -> torch.Tensor:
        """Replay the graph `key` over the staged buffers; logits of the real rows [n, vocab]."""
        self.graphs[key].replay()
        return self.logits[key][:num_decodes]
