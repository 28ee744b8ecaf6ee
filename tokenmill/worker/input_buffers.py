"""The runner's persistent input buffers: one set on the device that every step, eager or
replayed from a CUDA graph, reads its inputs from.

Each step the runner computes its flattened inputs on the host (`input_batch.HostInputs`), writes them
into a pinned host twin and copies the live prefix to the device with one async copy per buffer.
There are two twins per buffer, used in turn: under async scheduling the host writes step N+1's
inputs while step N's copies may still wait in the stream. A CUDA graph captured over
`capture_views(batch)` reads whatever a later step staged there, so eager and graph paths share the same
code and the same buffers. On the CPU the "device" buffers are the host ones (no copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.model.attention.backend import AttentionMetadata, StepBatch
from tokenmill.worker.input_batch import HostInputs
from tokenmill.utils.transfer import to_device


@dataclass(slots=True)
class StagedStep:
    """A step's inputs on the device (views of the persistent buffers) and its attention batch."""

    input_ids: torch.Tensor  # [num_tokens (padded)]
    positions: torch.Tensor
    batch: StepBatch
    # Rows whose input token the previous step sampled on the device: where it goes in input_ids
    # and where it is in that step's sampled tokens (int64 [num lag rows] each; None without them).
    lag_dst: torch.Tensor | None = None
    lag_src: torch.Tensor | None = None


class _Buffer:
    """A device tensor and its host twins (pinned on CUDA; on the CPU the device tensor itself)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.device_tensor = torch.zeros(shape, dtype=dtype, device=device)
        if device.type == "cpu":
            self.hosts = [self.device_tensor]
        else:
            self.hosts = [torch.zeros(shape, dtype=dtype, pin_memory=True) for _ in range(2)]
        self.nps = [h.numpy() for h in self.hosts]
        self.copies = device.type != "cpu"


class InputBuffers:
    def __init__(self, max_tokens: int, max_reqs: int, max_blocks: int, device: torch.device) -> None:
        self.device = device
        self.max_tokens, self.max_reqs, self.max_blocks = max_tokens, max_reqs, max_blocks
        self.input_ids = _Buffer((max_tokens,), torch.long, device)
        self.positions = _Buffer((max_tokens,), torch.long, device)
        self.slot_mapping = _Buffer((max_tokens,), torch.long, device)
        self.query_start_loc = _Buffer((max_reqs + 1,), torch.int32, device)
        self.seq_lens = _Buffer((max_reqs,), torch.int32, device)
        self.block_table = _Buffer((max_reqs, max_blocks), torch.int32, device)
        # Packed rows of a strided corner of the table on their way in (`_stage_block_table`).
        self._table_staging = torch.empty(max_reqs * max_blocks if self.block_table.copies else 0,
                                          dtype=torch.int32, device=device)
        self.state_slots = _Buffer((max_reqs,), torch.int32, device)  # hybrid models; -1 elsewhere
        self.lag_rows = _Buffer((2, max_reqs), torch.long, device)  # (input row, sampled row) pairs
        self._turn = 0
        self._twins = len(self.input_ids.hosts)

    def stage(self, host: HostInputs, pad_to: int | None = None,
              lag_sources: list[int] | None = None) -> StagedStep:
        """Write `host` into the buffers and start the copies. `pad_to`: a decode batch padded to
        that many requests (a CUDA graph's size): padded rows have seq_len 0 and slot -1 (the decode
        kernel writes zeros for them and no KV is written). `lag_sources`: for each of
        `host.lag_rows`, its row in the previous step's sampled tokens (`StagedStep.lag_src`)."""
        num_reqs, num_tokens = len(host.seq_lens), len(host.input_ids)
        reqs = pad_to or num_reqs
        tokens = num_tokens + (reqs - num_reqs)  # (padding only for decode batches: a token each)
        if tokens > self.max_tokens or reqs > self.max_reqs:
            raise RuntimeError(f"a step of {num_tokens} tokens / {num_reqs} requests exceeds the input "
                               f"buffers ({self.max_tokens} / {self.max_reqs})")
        turn = self._turn
        self._turn = (turn + 1) % self._twins
        state_slots = host.state_slots if host.state_slots is not None else np.full(num_reqs, -1, np.int32)
        for buf, values, pad, length in ((self.input_ids, host.input_ids, 0, tokens),
                                         (self.positions, host.positions, 0, tokens),
                                         (self.slot_mapping, host.slot_mapping, -1, tokens),
                                         (self.seq_lens, host.seq_lens, 0, reqs),
                                         (self.state_slots, state_slots, -1, reqs)):
            np_host = buf.nps[turn]
            np_host[:len(values)] = values
            np_host[len(values):length] = pad
            if buf.copies:
                buf.device_tensor[:length].copy_(buf.hosts[turn][:length], non_blocking=True)
        qsl = self.query_start_loc.nps[turn]
        qsl[:num_reqs + 1] = host.query_start
        if reqs > num_reqs:  # padded decodes: one token each
            qsl[num_reqs + 1:reqs + 1] = num_tokens + np.arange(1, reqs - num_reqs + 1)
        if self.query_start_loc.copies:
            self.query_start_loc.device_tensor[:reqs + 1].copy_(self.query_start_loc.hosts[turn][:reqs + 1],
                                                                non_blocking=True)
        self._stage_block_table(turn, host.block_table, reqs)
        lag_dst = lag_src = None
        if host.lag_rows:
            num_lag = len(host.lag_rows)
            pairs = self.lag_rows.nps[turn]
            pairs[0, :num_lag] = host.query_start[host.lag_rows]
            pairs[1, :num_lag] = lag_sources
            if self.lag_rows.copies:  # both rows of the pair block in one copy, whole (a slice is strided)
                self.lag_rows.device_tensor.copy_(self.lag_rows.hosts[turn], non_blocking=True)
            lag_dst, lag_src = self.lag_rows.device_tensor[0, :num_lag], self.lag_rows.device_tensor[1, :num_lag]
        meta = AttentionMetadata(
            num_reqs=reqs, num_tokens=tokens, num_decodes=host.num_decodes + (reqs - num_reqs),
            max_query_len=host.max_query_len, max_seq_len=int(host.seq_lens.max()),
            query_start_loc=self.query_start_loc.device_tensor[:reqs + 1],
            seq_lens=self.seq_lens.device_tensor[:reqs],
            block_table=self.block_table.device_tensor[:reqs],
            slot_mapping=self.slot_mapping.device_tensor[:tokens],
            query_start_loc_cpu=self.query_start_loc.hosts[turn][:reqs + 1],
            seq_lens_cpu=self.seq_lens.hosts[turn][:reqs],
            state_slots=self.state_slots.device_tensor[:reqs])
        if host.state_restores is not None:  # (eager steps only: a restoring request prefills)
            meta.state_restores = to_device(host.state_restores, torch.int64, self.device)
        if host.state_checkpoints is not None:
            meta.state_checkpoints = to_device(host.state_checkpoints, torch.int32, self.device)
            meta.state_checkpoint_interval = host.state_checkpoint_interval
        return StagedStep(self.input_ids.device_tensor[:tokens], self.positions.device_tensor[:tokens],
                          StepBatch(meta, host.block_table, host.seq_lens), lag_dst, lag_src)

    def _stage_block_table(self, turn: int, table: np.ndarray, reqs: int) -> None:
        """The step's [requests, blocks] corner of the block table (padded rows zero). The rows
        go packed into the pinned twin and over in one copy. Where the corner is strided on the
        device (more than one request, fewer than all columns) they land in a staging buffer and
        are spread there: copied as a strided tensor, torch would stage them through pageable
        memory (a copy that may wait for the stream, `utils/transfer.py`)."""
        num_reqs, num_blocks = table.shape
        buf = self.block_table
        corner = buf.device_tensor[:reqs, :num_blocks]
        if not buf.copies:  # the "device" table is the host one: the corner in place
            rows = buf.nps[turn][:reqs, :num_blocks]
            rows[:num_reqs] = table
            rows[num_reqs:] = 0
            return
        size = reqs * num_blocks
        packed = buf.nps[turn].reshape(-1)[:size].reshape(reqs, num_blocks)
        packed[:num_reqs] = table
        packed[num_reqs:] = 0
        host_rows = buf.hosts[turn].view(-1)[:size].view(reqs, num_blocks)
        if corner.is_contiguous():  # one request, or every column: the packed rows are the corner
            corner.copy_(host_rows, non_blocking=True)
            return
        staging = self._table_staging[:size].view(reqs, num_blocks)
        staging.copy_(host_rows, non_blocking=True)
        corner.copy_(staging)

    def prepare_for_capture(self, max_batch: int) -> None:
        """Before capturing decode graphs: the warm-up and capture passes write no KV (slot -1) and
        attend nothing (seq_len 0). Run once, outside any capture: an op issued while a graph is
        captured would become part of it and run again at every replay."""
        self.slot_mapping.device_tensor[:max_batch].fill_(-1)
        self.seq_lens.device_tensor[:max_batch].zero_()
        self.state_slots.device_tensor[:max_batch].fill_(-1)  # ... and touch no recurrent state
        self.query_start_loc.device_tensor[:max_batch + 1].copy_(
            torch.arange(max_batch + 1, dtype=torch.int32, device=self.device))

    def capture_views(self, batch: int) -> StagedStep:
        """The buffers of a decode batch of `batch` requests, for a CUDA-graph capture: whatever a
        later `stage(..., pad_to=batch)` writes there is what the graph reads when replayed. Views
        only: nothing here runs on the device (`prepare_for_capture` set the contents)."""
        meta = AttentionMetadata(
            num_reqs=batch, num_tokens=batch, num_decodes=batch, max_query_len=1, max_seq_len=1,
            query_start_loc=self.query_start_loc.device_tensor[:batch + 1],
            seq_lens=self.seq_lens.device_tensor[:batch],
            block_table=self.block_table.device_tensor[:batch],
            slot_mapping=self.slot_mapping.device_tensor[:batch],
            state_slots=self.state_slots.device_tensor[:batch])
        host_table = np.zeros((batch, 1), np.int32)
        return StagedStep(self.input_ids.device_tensor[:batch], self.positions.device_tensor[:batch],
                          StepBatch(meta, host_table, np.zeros(batch, np.int32)))
