"""The batched sampler against straightforward references."""

import torch

from tokenmill.worker.sampler import Sampler, SamplingBatch, apply_top_k_top_p

V = 50


def batch(n, **overrides) -> SamplingBatch:
    values = dict(temperature=[1.0] * n, top_k=[0] * n, top_p=[1.0] * n, min_p=[0.0] * n,
                  generators=[None] * n, num_logprobs=[None] * n)
    values.update(overrides)
    return SamplingBatch(**values)


def test_greedy_is_argmax():
    logits = torch.randn(4, V)
    out = Sampler()(logits.clone(), batch(4, temperature=[0.0] * 4))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_seeded_rows_reproduce_regardless_of_batch():
    torch.manual_seed(0)
    logits = torch.randn(1, V)
    def sample_with(others: int) -> list[int]:
        rows = torch.cat([logits, torch.randn(others, V)])
        g = torch.Generator().manual_seed(1234)
        tokens = []
        for _ in range(20):
            b = batch(1 + others, generators=[g] + [None] * others)
            tokens.append(Sampler()(rows.clone(), b).token_ids[0])
        return tokens
    assert sample_with(0) == sample_with(5) == sample_with(2)


def test_top_k_top_p_min_p_restrict_support():
    torch.manual_seed(1)
    logits = torch.randn(1, V) * 3
    probs = torch.softmax(logits[0], -1)
    order = probs.argsort(descending=True)
    top3 = set(order[:3].tolist())
    cum = probs[order].cumsum(0)
    nucleus = set(order[: int((cum < 0.6).sum()) + 1].tolist())
    min_p_allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    cases = [(dict(top_k=[3]), top3), (dict(top_p=[0.6]), nucleus), (dict(min_p=[0.2]), min_p_allowed)]
    for kwargs, allowed in cases:
        seen = set()
        for _ in range(300):
            seen.add(Sampler()(logits.clone(), batch(1, **kwargs)).token_ids[0])
        assert seen <= allowed, kwargs
        assert len(seen) > 1 or len(allowed) == 1


def test_top_p_keeps_at_least_one():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    apply_top_k_top_p(logits, [0], [0.01])
    assert torch.isfinite(logits[0, 0]) and torch.isinf(logits[0, 1:]).all()


def test_penalties_match_reference():
    torch.manual_seed(2)
    logits = torch.randn(1, V)
    prompt, output = [1, 2, 3], [3, 4, 4, 7]
    rep, pres, freq = 1.3, 0.5, 0.25
    ref = logits.clone()[0]
    counts = torch.zeros(V)
    for t in output:
        counts[t] += 1
    for t in set(prompt) | set(output):
        ref[t] = ref[t] / rep if ref[t] > 0 else ref[t] * rep
    ref -= freq * counts
    ref -= pres * (counts > 0).float()
    b = batch(1, temperature=[0.0])
    b.penalties = {0: (rep, pres, freq)}
    b.prompt_token_ids = {0: prompt}
    b.output_token_ids = {0: output}
    processed = logits.clone()
    Sampler()(processed, b)
    torch.testing.assert_close(processed[0], ref)


def test_logit_bias_and_suppression():
    logits = torch.zeros(2, V)
    b = batch(2, temperature=[0.0, 0.0])
    b.logit_bias = {0: {17: 100.0}}
    b.suppressed_tokens = {1: [0]}
    logits[1, 0] = 50.0
    out = Sampler()(logits, b)
    assert out.token_ids[0] == 17 and out.token_ids[1] != 0


def test_logprobs_rank_and_topk():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    out = Sampler()(logits.clone(), batch(1, temperature=[0.0], num_logprobs=[2]))
    lp = out.logprobs[0]
    ref = torch.log_softmax(logits[0], -1)
    assert lp.token_ids == [1, 1, 2] and lp.ranks == [1, 1, 2]
    assert abs(lp.logprobs[0] - float(ref[1])) < 1e-6


def test_batched_logprobs_match_a_sorted_reference():
    # Rows with different k (and none), some greedy and some sampled: each row's report must be
    # its own chosen token's log-probability and rank, then its top-k in order.
    torch.manual_seed(3)
    n = 6
    logits = torch.randn(n, V) * 2
    ks = [0, 3, None, 5, 3, 1]
    out = Sampler()(logits.clone(), batch(n, temperature=[0.0, 0.8, 0.0, 1.0, 0.0, 0.5], num_logprobs=ks))
    ref = torch.log_softmax(logits, -1)
    for i, k in enumerate(ks):
        if k is None:
            assert out.logprobs[i] is None
            continue
        token = out.token_ids[i]
        order = ref[i].argsort(descending=True).tolist()
        lp = out.logprobs[i]
        assert lp.token_ids == [token] + order[:k]
        assert lp.ranks == [order.index(token) + 1] + list(range(1, k + 1))
        assert lp.logprobs == [ref[i, t].item() for t in lp.token_ids]


def test_one_temperature_for_the_batch_samples_like_per_row_temperatures():
    # The shared-temperature fast path must give the very tokens of the per-row path.
    logits = torch.randn(8, V)
    torch.manual_seed(7)
    shared = Sampler()(logits.clone(), batch(8, temperature=[0.7] * 8)).token_ids
    torch.manual_seed(7)
    noise = torch.empty(8, V).exponential_()
    probs = torch.softmax(logits / torch.full((8, 1), 0.7), -1)
    assert shared == (probs / noise).argmax(-1).tolist()
