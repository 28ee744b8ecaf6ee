"""Batch-invariant layers on the CPU (docs/rl.md): a row's result is bit-identical whether it is
computed alone or among any number of other rows, for the linear layers (oneDNN switches kernels
with the row count in bf16), SiLU-and-mul (torch's vector and scalar loops differ in the last
bit) and attention (a query alone, in a decode batch, or inside a prefill chunk)."""

from __future__ import annotations

import pytest
import torch

from layer_context import layers_for
from tokenmill.model.attention.batch_invariant import BatchInvariantBackend
from tokenmill.model.attention.backend import AttentionMetadata
from tokenmill.model.layers.activation import SiluAndMul
from tokenmill.model.layers.linear import ColumnParallelLinear
from tokenmill.model.attention.torch_native import TorchNativeBackend


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_linear_rows_do_not_depend_on_the_batch(dtype):
    torch.manual_seed(0)
    with layers_for("cpu", batch_invariant=True):
        layer = ColumnParallelLinear(576, 1536).to(dtype)
    layer.weight.data.normal_(0, 0.05)
    layer.process_weights_after_loading()
    x = torch.randn(300, 576).to(dtype)
    full = layer(x)
    assert torch.allclose(full.float(), (x.float() @ layer.weight.float().T), rtol=0.05, atol=0.05)
    for rows in (slice(0, 1), slice(5, 6), slice(10, 43), slice(100, 300)):
        assert torch.equal(layer(x[rows]), full[rows]), rows


def test_silu_and_mul_elements_do_not_depend_on_the_tensor_size():
    torch.manual_seed(0)
    with layers_for("cpu", batch_invariant=True):
        act = SiluAndMul()
    x = torch.randn(97, 2 * 45) * 4  # odd sizes: the scalar tail falls on different elements
    full = act(x)
    assert torch.allclose(full, torch.nn.functional.silu(x[:, :45]) * x[:, 45:], rtol=1e-6, atol=1e-6)
    for rows in (slice(0, 1), slice(3, 4), slice(2, 33), slice(50, 97)):
        assert torch.equal(act(x[rows]), full[rows]), rows


def _meta(query_lens, seq_lens, block_table, block_size):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    num_decodes = sum(1 for n in query_lens if n == 1)
    slots = []
    for i, (n, s) in enumerate(zip(query_lens, seq_lens)):
        for pos in range(s - n, s):
            slots.append(int(block_table[i, pos // block_size]) * block_size + pos % block_size)
    qsl = torch.tensor(starts, dtype=torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return AttentionMetadata(num_reqs=len(seq_lens), num_tokens=starts[-1], num_decodes=num_decodes,
                             max_query_len=max(query_lens), max_seq_len=max(seq_lens), query_start_loc=qsl,
                             seq_lens=lens, block_table=block_table, slot_mapping=torch.tensor(slots),
                             query_start_loc_cpu=qsl, seq_lens_cpu=lens)


def test_attention_rows_do_not_depend_on_batching_or_chunking():
    """One request's tokens computed as one prefill, then again as chunks and as decodes batched
    with another request: every query row's output is bit-identical, and close to torch_native."""
    torch.manual_seed(0)
    heads, kv_heads, dim, block_size, seq = 4, 2, 32, 4, 70
    with layers_for("cpu", batch_invariant=True):
        backend = BatchInvariantBackend(heads, kv_heads, dim, dim ** -0.5)
    q = torch.randn(seq, heads, dim, dtype=torch.bfloat16)
    k = torch.randn(seq, kv_heads, dim, dtype=torch.bfloat16)
    v = torch.randn(seq, kv_heads, dim, dtype=torch.bfloat16)
    other = [torch.randn(seq, h, dim, dtype=torch.bfloat16) for h in (heads, kv_heads, kv_heads)]
    table = torch.arange(40, dtype=torch.int32).view(2, 20)  # request 0: blocks 0-19, request 1: 20-39

    def cache():
        shape = (40, block_size, kv_heads, dim)
        return torch.zeros(shape, dtype=torch.bfloat16), torch.zeros(shape, dtype=torch.bfloat16)

    whole_cache = cache()
    whole = backend.forward(q, k, v, whole_cache, _meta([seq], [seq], table[:1], block_size))
    reference = TorchNativeBackend(heads, kv_heads, dim, dim ** -0.5).forward(
        q, k, v, cache(), _meta([seq], [seq], table[:1], block_size))
    assert torch.allclose(whole.float(), reference.float(), atol=2e-2, rtol=2e-2)
    # Chunks of 23, 30, then single tokens decoded beside the other request's prefill.
    kv = cache()
    pieces = [backend.forward(q[0:23], k[0:23], v[0:23], kv, _meta([23], [23], table[:1], block_size)),
              backend.forward(q[23:53], k[23:53], v[23:53], kv, _meta([30], [53], table[:1], block_size))]
    for pos in range(53, seq):
        n = pos - 52  # the other request's prompt grows alongside
        out = backend.forward(torch.cat([q[pos:pos + 1], other[0][:n]]), torch.cat([k[pos:pos + 1], other[1][:n]]),
                              torch.cat([v[pos:pos + 1], other[2][:n]]), kv,
                              _meta([1, n], [pos + 1, n], table, block_size))
        pieces.append(out[:1])
    assert torch.equal(torch.cat(pieces), whole)
