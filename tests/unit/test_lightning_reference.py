"""The torch references of lightning attention against the plain recurrence, token by token
(S = lambda S + k^T v, o = q S): block scans with carried state, chunk boundaries anywhere,
checkpoints at interval boundaries, the one-token-prompt and padding cases of decode."""

from __future__ import annotations

import torch

from tokenmill.ops.lightning_attention_ref import lightning_decode_ref, lightning_prefill_ref

H, D = 3, 8


def recurrence(q, k, v, slopes):
    """[n, H, D] -> (outputs [n, H, D], states after each token [n, H, D, D]), float64."""
    state = torch.zeros(H, D, D, dtype=torch.float64)
    outs, states = [], []
    decay = torch.exp(-slopes.double())[:, None, None]
    for t in range(q.shape[0]):
        state = decay * state + k[t].double()[:, :, None] * v[t].double()[:, None, :]
        outs.append(torch.einsum("hd,hde->he", q[t].double(), state))
        states.append(state)
    return torch.stack(outs), torch.stack(states)


def _inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, H, D, generator=g) * 0.5 for _ in range(3))
    slopes = torch.tensor([0.5, 0.05, 1e-4])
    return q, k, v, slopes


def test_prefill_in_chunks_with_checkpoints():
    """Two requests (lengths 70 and 45) each prefilled in three chunks of odd sizes; the state
    continues through its slot, and checkpoints at every multiple of 16 hold the recurrence's state."""
    lengths, cuts = [70, 45], [[0, 13, 40, 70], [0, 17, 18, 45]]
    inputs = [_inputs(n, seed=i) for i, n in enumerate(lengths)]
    slopes = inputs[0][3]
    pool = torch.full((12, H, D, D), float("nan"))  # stale slots: a first chunk must not read them
    outs = [torch.empty(n, H, D) for n in lengths]
    checkpoint_slot = {}
    next_free = 2
    for c in range(3):
        qs, ks, vs, starts, seq_lens, tables = [], [], [], [0], [], []
        for i, n in enumerate(lengths):
            a, b = cuts[i][c], cuts[i][c + 1]
            q, k, v, _ = inputs[i]
            qs.append(q[a:b]), ks.append(k[a:b]), vs.append(v[a:b])
            starts.append(starts[-1] + b - a)
            seq_lens.append(b)
            row = []
            for boundary in range(a // 16 * 16 + 16, b + 1, 16):
                checkpoint_slot[(i, boundary)] = next_free
                row.append(next_free)
                next_free += 1
            tables.append(row)
        out = torch.empty(starts[-1], H, D)
        lightning_prefill_ref(torch.cat(qs), torch.cat(ks), torch.cat(vs), slopes, pool, starts, seq_lens,
                              [0, 1], out, 0, tables, 16)
        for i in range(2):
            outs[i][cuts[i][c]:cuts[i][c + 1]] = out[starts[i]:starts[i + 1]]
    for i, n in enumerate(lengths):
        q, k, v, _ = inputs[i]
        ref_out, ref_states = recurrence(q, k, v, slopes)
        torch.testing.assert_close(outs[i].double(), ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(pool[i].double(), ref_states[-1], rtol=1e-4, atol=1e-5)
        for (j, boundary), slot in checkpoint_slot.items():
            if j == i:
                torch.testing.assert_close(pool[slot].double(), ref_states[boundary - 1], rtol=1e-4, atol=1e-5)


def test_decode_continues_the_state():
    q, k, v, slopes = _inputs(21)
    pool = torch.full((4, H, D, D), float("nan"))
    out = torch.empty(20, H, D)
    lightning_prefill_ref(q[:20], k[:20], v[:20], slopes, pool, [0, 20], [20], [2], out, 0)
    # Row 0 continues slot 2; row 1 is a one-token prompt in stale slot 3; row 2 is padding.
    dq = torch.stack([q[20], q[0], q[0]])
    dk = torch.stack([k[20], k[0], k[0]])
    dv = torch.stack([v[20], v[0], v[0]])
    dout = torch.full((3, H, D), float("nan"))
    lightning_decode_ref(dq, dk, dv, slopes, pool, torch.tensor([21, 1, 0]), torch.tensor([2, 3, -1]), dout)
    ref_out, ref_states = recurrence(q, k, v, slopes)
    torch.testing.assert_close(dout[0].double(), ref_out[20], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pool[2].double(), ref_states[20], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dout[1].double(), ref_out[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pool[3].double(), ref_states[0], rtol=1e-4, atol=1e-5)
    assert torch.equal(dout[2], torch.zeros_like(dout[2]))
