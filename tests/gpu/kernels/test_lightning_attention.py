"""The lightning-attention Triton kernels (block-scan prefill, recurrent decode) against their
torch references (themselves checked against the plain recurrence in tests/unit).

Ragged batches of chunks with and without a carried state, states continued across chunk
boundaries, checkpoints at interval boundaries, one-token prompts and padding slots. Runs on the
GPU or under TRITON_INTERPRET=1 (float16 there).
"""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: F401  (skips the module without a GPU or the interpreter)
from test_attention_kernels import gpu_only, rel_err  # noqa: E402

from tokenmill.ops.lightning_attention import lightning_decode, lightning_prefill  # noqa: E402
from tokenmill.ops.lightning_attention_ref import lightning_decode_ref, lightning_prefill_ref  # noqa: E402

DTYPE = torch.float16 if INTERPRET else torch.bfloat16
REL_TOL = 1e-2


def slopes_for(num_heads: int) -> torch.Tensor:
    """MiniMax's per-head rates (base^(h+1), base = 2^(-8/H)), at a middle layer."""
    base = 2 ** (-8 / num_heads)
    return torch.tensor([base ** (h + 1) * 0.5 for h in range(num_heads)], dtype=torch.float32, device=DEVICE)


def qkv(num_tokens: int, num_heads: int, head_dim: int, strided: bool = True):
    """Views of one [T, H, 3 * D] tensor, as the model's split of its qkv projection makes them."""
    x = torch.rand(num_tokens, num_heads, 3 * head_dim, dtype=DTYPE, device=DEVICE) * 0.5
    if not strided:
        x = x.contiguous()
    return x[..., :head_dim], x[..., head_dim:2 * head_dim], x[..., 2 * head_dim:]


def batch_tensors(query_lens, seq_lens):
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    return (torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE), starts)


def checkpoint_table(query_lens, seq_lens, interval, first_slot):
    """A slot for every interval boundary inside each chunk: [num_reqs, max] int32 (-1 padding)."""
    rows, slot = [], first_slot
    for n, s in zip(query_lens, seq_lens):
        count = s // interval - (s - n) // interval
        rows.append(list(range(slot, slot + count)))
        slot += count
    width = max(1, max(len(r) for r in rows))
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        table[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return table.to(DEVICE), rows, slot


@pytest.mark.parametrize("num_heads,head_dim", [(4, 64), (2, 128), (3, 48)])
@pytest.mark.parametrize("interval", [0, 16, 64])
def test_prefill_matches_reference(num_heads, head_dim, interval):
    torch.manual_seed(0)
    # Fresh prompts, chunks continuing a state (context > 0), one not aligned to any block, and a
    # request without a slot (the profile run's -1).
    query_lens = [37, 100, 5, 70, 20]
    seq_lens = [37, 100 + 30, 5 + 64, 70 + 7, 20]
    state_slots = [0, 1, 2, 3, -1]
    q, k, v = qkv(sum(query_lens), num_heads, head_dim)
    slopes = slopes_for(num_heads)
    qsl, sl, starts = batch_tensors(query_lens, seq_lens)
    table, rows, num_slots = checkpoint_table(query_lens, seq_lens, interval or 16, 4)
    pool = torch.randn(num_slots, num_heads, head_dim, head_dim, dtype=torch.float32, device=DEVICE) * 0.1
    pool_ref = pool.clone()
    out_ref = torch.zeros(q.shape, dtype=torch.float32, device=DEVICE)
    lightning_prefill_ref(q.float(), k.float(), v.float(), slopes, pool_ref, starts, seq_lens, state_slots,
                          out_ref, 0, [list(r) for r in rows] if interval else None, interval)
    out = torch.full(q.shape, float("nan"), dtype=DTYPE, device=DEVICE)
    slots = torch.tensor(state_slots, dtype=torch.int32, device=DEVICE)
    lightning_prefill(q, k, v, slopes, pool, qsl, sl, slots, out, 0, len(query_lens),
                      table if interval else None, interval)
    assert rel_err(out, out_ref) < REL_TOL
    for slot in range(4):
        assert rel_err(pool[slot], pool_ref[slot]) < REL_TOL, slot
    if interval:
        for r in rows:
            for slot in r:
                assert rel_err(pool[slot], pool_ref[slot]) < REL_TOL, slot


@pytest.mark.parametrize("num_heads,head_dim", [(4, 64), (2, 128)])
def test_chunked_prefill_then_decode_equals_one_pass(num_heads, head_dim):
    """A 90-token sequence as chunks of 33 + 40 (state carried in the slot), then 17 decode steps,
    against the reference doing the whole prompt at once and the same decodes."""
    torch.manual_seed(1)
    n_prompt, n_decode = 73, 17
    q, k, v = qkv(n_prompt + n_decode, num_heads, head_dim, strided=False)
    slopes = slopes_for(num_heads)
    pool = torch.zeros(2, num_heads, head_dim, head_dim, dtype=torch.float32, device=DEVICE)
    out = torch.empty(q.shape, dtype=DTYPE, device=DEVICE)
    for a, b in ((0, 33), (33, 73)):
        qsl, sl, _ = batch_tensors([b - a], [b])
        lightning_prefill(q[a:b], k[a:b], v[a:b], slopes, pool, qsl, sl, torch.tensor([1], dtype=torch.int32,
                          device=DEVICE), out[a:b], 0, 1)
    for t in range(n_prompt, n_prompt + n_decode):
        lightning_decode(q[t:t + 1], k[t:t + 1], v[t:t + 1], slopes, pool,
                         torch.tensor([t + 1], dtype=torch.int32, device=DEVICE),
                         torch.tensor([1], dtype=torch.int32, device=DEVICE), out[t:t + 1])
    pool_ref = torch.zeros_like(pool)
    out_ref = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    lightning_prefill_ref(q[:n_prompt].float(), k[:n_prompt].float(), v[:n_prompt].float(), slopes, pool_ref,
                          [0, n_prompt], [n_prompt], [1], out_ref[:n_prompt], 0)
    for t in range(n_prompt, n_prompt + n_decode):
        lightning_decode_ref(q[t:t + 1].float(), k[t:t + 1].float(), v[t:t + 1].float(), slopes, pool_ref,
                             torch.tensor([t + 1], device=DEVICE), torch.tensor([1], device=DEVICE),
                             out_ref[t:t + 1])
    assert rel_err(out, out_ref) < REL_TOL
    assert rel_err(pool[1], pool_ref[1]) < REL_TOL


@pytest.mark.parametrize("num_heads,head_dim", [(4, 64), (8, 128), (3, 48)])
def test_decode_matches_reference(num_heads, head_dim):
    """Continuing states, a one-token prompt (its stale slot not read) and padding (slot -1)."""
    torch.manual_seed(2)
    num = 6
    q, k, v = qkv(num, num_heads, head_dim)
    slopes = slopes_for(num_heads)
    pool = torch.randn(8, num_heads, head_dim, head_dim, dtype=torch.float32, device=DEVICE) * 0.1
    seq_lens = torch.tensor([5, 1, 300, 2, 0, 9], dtype=torch.int32, device=DEVICE)
    slots = torch.tensor([3, 0, 7, 5, -1, 1], dtype=torch.int32, device=DEVICE)
    pool_ref = pool.clone()
    out_ref = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    lightning_decode_ref(q.float(), k.float(), v.float(), slopes, pool_ref, seq_lens, slots, out_ref)
    out = torch.full(q.shape, float("nan"), dtype=DTYPE, device=DEVICE)
    lightning_decode(q, k, v, slopes, pool, seq_lens, slots, out)
    assert torch.equal(out[4], torch.zeros_like(out[4]))
    live = [0, 1, 2, 3, 5]
    assert rel_err(out[live], out_ref[live]) < REL_TOL
    assert rel_err(pool, pool_ref) < REL_TOL


@gpu_only
def test_prefill_long():
    """32k tokens of one request in 8k chunks with checkpoints every 512, at MiniMax-M1's head size."""
    torch.manual_seed(3)
    num_heads, head_dim, total, chunk = 8, 128, 32768, 8192
    q, k, v = qkv(total, num_heads, head_dim)
    slopes = slopes_for(num_heads)
    pool = torch.zeros(2 + total // 512, num_heads, head_dim, head_dim, dtype=torch.float32, device=DEVICE)
    pool_ref = pool.clone()
    out = torch.empty(q.shape, dtype=DTYPE, device=DEVICE)
    out_ref = torch.empty(q.shape, dtype=torch.float32, device=DEVICE)
    for a in range(0, total, chunk):
        b = a + chunk
        qsl, sl, starts = batch_tensors([chunk], [b])
        table, rows, _ = checkpoint_table([chunk], [b], 512, 2 + a // 512)
        slot = torch.tensor([0], dtype=torch.int32, device=DEVICE)
        lightning_prefill(q[a:b], k[a:b], v[a:b], slopes, pool, qsl, sl, slot, out[a:b], 0, 1, table, 512)
        lightning_prefill_ref(q[a:b].float(), k[a:b].float(), v[a:b].float(), slopes, pool_ref, starts, [b], [0],
                              out_ref[a:b], 0, rows, 512)
    assert rel_err(out, out_ref) < REL_TOL
    assert rel_err(pool, pool_ref) < REL_TOL
