"""The runner's persistent input buffers (worker/input_buffers.py): a step staged with padding for a
CUDA graph, and the capture views, which must not touch the contents (an op issued while a graph is
being captured would run again at every replay)."""

from __future__ import annotations

import numpy as np
import torch

from tokenmill.worker.input_batch import HostInputs
from tokenmill.worker.input_buffers import InputBuffers


def _decode_host(n: int) -> HostInputs:
    seq_lens = np.arange(10, 10 + n, dtype=np.int32)
    table = np.arange(n * 2, dtype=np.int32).reshape(n, 2)
    return HostInputs(input_ids=np.arange(100, 100 + n), positions=seq_lens.astype(np.int64) - 1,
                      slot_mapping=np.arange(40, 40 + n), seq_lens=seq_lens, block_table=table,
                      query_start=np.arange(n + 1), num_decodes=n, max_query_len=1,
                      num_known=seq_lens.astype(np.int64), lag_rows=[])


def test_a_decode_batch_padded_for_a_graph():
    buffers = InputBuffers(max_tokens=16, max_reqs=8, max_blocks=4, device=torch.device("cpu"))
    staged = buffers.stage(_decode_host(3), pad_to=4)
    meta = staged.batch.meta
    assert meta.num_reqs == meta.num_decodes == meta.num_tokens == 4
    assert staged.input_ids.tolist() == [100, 101, 102, 0]
    assert meta.slot_mapping.tolist() == [40, 41, 42, -1]  # the padded row writes no KV
    assert meta.seq_lens.tolist() == [10, 11, 12, 0]  # ... and attends nothing
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.block_table[:4, :2].tolist() == [[0, 1], [2, 3], [4, 5], [0, 0]]


def test_capture_views_leave_the_staged_contents_alone():
    buffers = InputBuffers(max_tokens=16, max_reqs=8, max_blocks=4, device=torch.device("cpu"))
    buffers.stage(_decode_host(3), pad_to=4)
    before = [t.clone() for t in (buffers.input_ids.device_tensor, buffers.slot_mapping.device_tensor,
                                  buffers.seq_lens.device_tensor, buffers.query_start_loc.device_tensor)]
    view = buffers.capture_views(4)
    after = (buffers.input_ids.device_tensor, buffers.slot_mapping.device_tensor,
             buffers.seq_lens.device_tensor, buffers.query_start_loc.device_tensor)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # The views are the staged storage: what a later step stages is what a replay reads.
    assert view.batch.meta.seq_lens.data_ptr() == buffers.seq_lens.device_tensor.data_ptr()
    buffers.prepare_for_capture(4)
    assert buffers.slot_mapping.device_tensor[:4].tolist() == [-1] * 4
    assert buffers.seq_lens.device_tensor[:4].tolist() == [0] * 4
