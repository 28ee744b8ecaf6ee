"""The fused MoE kernels (`ops/moe_align.py`, `ops/fused_moe.py`) against their torch references
(`moe_align_ref`; the MoE layer's plain-torch experts, `experts_ref`) on random inputs, with
ragged expert loads: experts no token chose, one expert taking every token, more experts than
entries, a single token, experts held by another rank (expert parallelism), several alignment
chunks. Runs on the GPU, or on the CPU under `TRITON_INTERPRET=1`."""

from __future__ import annotations

import pytest
import torch

from kernel_device import DEVICE, INTERPRET  # noqa: E402  (skips the module without a GPU)

from tokenmill.model.layers.moe.fused_moe import experts_ref  # noqa: E402
from tokenmill.ops import fused_moe_configs  # noqa: E402
from tokenmill.ops.fused_moe import fused_experts, new_sum_counters  # noqa: E402
from tokenmill.ops.fused_moe_configs import MoeGemvConfig, MoeKernelConfig  # noqa: E402
from tokenmill.ops.fused_moe_gemv import fused_experts_gemv  # noqa: E402
from tokenmill.ops.moe_align import moe_align, moe_align_ref  # noqa: E402

needs_cuda = pytest.mark.skipif(INTERPRET or DEVICE.type != "cuda", reason="CUDA graphs need a GPU")


def _routing(num_tokens: int, top_k: int, num_experts: int, kind: str, seed: int) -> torch.Tensor:
    """[T, k] int32 distinct experts per token. `kind`: "random"; "hot": expert 3 in every token's
    choice (one expert takes every token); "few": only experts 0..k (most experts empty)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_tokens):
        if kind == "few":
            pool = torch.randperm(top_k + 1, generator=g)[:top_k]
        else:
            pool = torch.randperm(num_experts, generator=g)[:top_k]
            if kind == "hot" and 3 not in pool.tolist():
                pool[0] = 3
        rows.append(pool)
    return torch.stack(rows).to(torch.int32)


def _expert_map(num_experts: int, held: list[int]) -> torch.Tensor:
    expert_map = torch.full((num_experts,), -1, dtype=torch.int32)
    expert_map[held] = torch.arange(len(held), dtype=torch.int32)
    return expert_map


ALIGN_CASES = [  # T, k, E, block_m, kind, chunk, expert parallel
    (1, 2, 8, 16, "random", None, False),  # more experts than entries
    (7, 2, 8, 16, "hot", None, False),
    (40, 4, 16, 16, "few", None, False),
    (33, 8, 64, 32, "random", None, False),
    (40, 4, 16, 16, "random", 16, False),  # ten chunks: the three-launch path
    (70, 2, 8, 64, "hot", 32, True),
    (5, 3, 12, 16, "random", None, True),
    (10, 8, 128, 16, "random", None, False),  # Qwen3-30B-A3B's experts, ten decodes (the small-batch kernel)
    (16, 8, 128, 16, "hot", None, True),  # its largest batch
]


@pytest.mark.parametrize("case", ALIGN_CASES, ids=str)
def test_moe_align_matches_reference(case):
    num_tokens, top_k, num_experts, block_m, kind, chunk, parallel = case
    topk_ids = _routing(num_tokens, top_k, num_experts, kind, seed=num_tokens)
    expert_map, num_local = None, num_experts
    if parallel:
        held = list(range(1, num_experts, 2))
        expert_map, num_local = _expert_map(num_experts, held), len(held)
    ref = moe_align_ref(topk_ids, block_m, num_local, expert_map)
    got = moe_align(topk_ids.to(DEVICE), block_m, num_local, None if expert_map is None else expert_map.to(DEVICE),
                    chunk=chunk)
    assert got.num_padded.item() == ref.num_padded.item()
    assert torch.equal(got.sorted_ids.cpu(), ref.sorted_ids)
    assert torch.equal(got.block_expert.cpu(), ref.block_expert)
    # Every local entry appears once; padding only where a run is not a whole block.
    used = got.sorted_ids[:got.num_padded.item()].cpu()
    real = used[used < topk_ids.numel()]
    assert sorted(real.tolist()) == [i for i, e in enumerate(topk_ids.flatten().tolist())
                                     if expert_map is None or expert_map[e] >= 0]


CONFIGS = [MoeKernelConfig(16, 32, 32, 1, 4, 2), MoeKernelConfig(32, 16, 16, 4, 4, 2),
           MoeKernelConfig(64, 64, 32, 8, 4, 2)]
EXPERT_CASES = [  # T, H, I, E, k, kind, expert parallel
    (1, 64, 48, 16, 4, "random", False),  # one token: 4 of 16 experts used
    (9, 48, 40, 8, 2, "hot", False),  # H, I no multiple of the blocks
    (30, 64, 32, 16, 4, "few", False),  # most experts empty, a few take all
    (26, 32, 48, 12, 3, "random", True),  # half the experts on another rank
]


def _weights(num_experts, hidden, inter, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5
    return w13.to(dtype), w2.to(dtype)


def _check_experts(case, config, dtype, tol, path="grouped", gemv_config=None, sum_counters=None):
    num_tokens, hidden, inter, num_experts, top_k, kind, parallel = case
    topk_ids = _routing(num_tokens, top_k, num_experts, kind, seed=hidden + num_tokens)
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    topk_weights = torch.rand(num_tokens, top_k, generator=g)
    held = list(range(0, num_experts, 2)) if parallel else list(range(num_experts))
    expert_map = _expert_map(num_experts, held)
    w13, w2 = _weights(len(held), hidden, inter, dtype, seed=num_experts)
    ref = experts_ref(x.float(), w13.float(), w2.float(), topk_weights, topk_ids, expert_map)
    args = (x.to(DEVICE), w13.to(DEVICE), w2.to(DEVICE), topk_weights.to(DEVICE), topk_ids.to(DEVICE),
            expert_map.to(DEVICE) if parallel else None)
    if gemv_config is not None:
        out = fused_experts_gemv(*args, config=gemv_config)
    else:
        out = fused_experts(*args, config=config, path=path, sum_counters=sum_counters)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
    return out


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}g{c.group_m}")
@pytest.mark.parametrize("case", EXPERT_CASES, ids=str)
def test_fused_experts_match_reference_float32(case, config):
    _check_experts(case, config, torch.float32, 1e-4)


# Triton 3.9's interpreter multiplies bfloat16 tiles in `tl.dot` wrongly (raw bits): bfloat16 runs on GPUs only.
BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(INTERPRET, reason="interpreter's bf16 tl.dot"))


@pytest.mark.parametrize("dtype", [BF16, torch.float16])
@pytest.mark.parametrize("case", EXPERT_CASES[:3], ids=str)
def test_fused_experts_match_reference_half(case, dtype):
    _check_experts(case, CONFIGS[0], dtype, 3e-2)


GEMV_CASES = [  # T, H, I, E, k, kind, expert parallel: the token-by-token path's sizes
    (1, 64, 48, 16, 4, "random", False),
    (3, 300, 40, 8, 2, "hot", False),  # H past one K slice, no multiple of it; I no multiple of BLOCK_N
    (4, 48, 520, 12, 3, "random", True),  # I past one K slice; half the experts on another rank
    (2, 32, 24, 4, 4, "random", False),  # every expert chosen by both tokens
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", GEMV_CASES, ids=str)
def test_token_by_token_path_matches_reference(case, dtype):
    _check_experts(case, None, dtype, 1e-4 if dtype == torch.float32 else 3e-2, path="gemv")


def test_auto_path_takes_gemv_for_a_few_tokens(monkeypatch):
    from tokenmill.ops import fused_moe, fused_moe_configs as configs

    taken = []
    monkeypatch.setattr(fused_moe, "fused_experts_gemv", lambda *a, **kw: taken.append(a[0].shape[0]) or a[0])
    x = torch.zeros(configs.GEMV_MAX_TOKENS, 16, device=DEVICE)
    w13, w2 = torch.zeros(4, 16, 16, device=DEVICE), torch.zeros(4, 16, 8, device=DEVICE)
    ids = torch.zeros(x.shape[0], 1, dtype=torch.int32, device=DEVICE)
    fused_moe.fused_experts(x, w13, w2, torch.ones(x.shape[0], 1, device=DEVICE), ids)
    assert taken == [configs.GEMV_MAX_TOKENS]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}k{c.block_k}g{c.group_m}")
@pytest.mark.parametrize("case", [c for c in EXPERT_CASES if not c[-1]], ids=str)
def test_down_gemm_sums_the_top_k(case, config):
    """With counters the down GEMM sums each token's k rows itself: the reference's result, the
    separate sum's to float32 rounding, and the counters left zero for the next call (run twice)."""
    num_tokens, hidden, inter, num_experts, top_k, kind, _ = case
    counters = new_sum_counters(num_tokens, hidden, DEVICE)
    ids = _routing(num_tokens, top_k, num_experts, kind, seed=7).to(DEVICE)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(num_tokens, hidden, generator=g).to(DEVICE)
    weights = torch.rand(num_tokens, top_k, generator=g).to(DEVICE)
    w13, w2 = (w.to(DEVICE) for w in _weights(num_experts, hidden, inter, torch.float32, seed=1))
    separate = fused_experts(x, w13, w2, weights, ids, config=config, path="grouped")
    for _ in range(2):
        summed = fused_experts(x, w13, w2, weights, ids, config=config, path="grouped", sum_counters=counters)
        torch.testing.assert_close(summed, separate, rtol=1e-6, atol=1e-6)
        assert not counters.any()
    ref = experts_ref(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(),
                      torch.arange(num_experts, dtype=torch.int32))
    torch.testing.assert_close(summed.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_too_few_counters_sum_separately(monkeypatch):
    """Counters too small for the call (or experts on another rank): the separate sum, still right."""
    case = EXPERT_CASES[1]
    out = _check_experts(case, CONFIGS[0], torch.float32, 1e-4)
    small = new_sum_counters(1, case[1], DEVICE)
    again = _check_experts(case, CONFIGS[0], torch.float32, 1e-4, sum_counters=small)
    assert torch.equal(out, again) and not small.any()


# The token-by-token path's configurations: the default, the sweep space's extremes
# (benchmarks/kernels/fused_moe.py), and every measured one.
_GEMV_CONFIGS = sorted({fused_moe_configs.DEFAULT_GEMV, MoeGemvConfig(8, 128, 4, 16, 64, 4),
                        MoeGemvConfig(32, 512, 8, 64, 256, 8)}
                       | {c for table in fused_moe_configs.TUNED_GEMV.values() for c in table.values()})


@pytest.mark.parametrize("config", _GEMV_CONFIGS, ids=str)
@pytest.mark.parametrize("case", GEMV_CASES[:3], ids=str)
def test_token_by_token_configs_give_the_product(case, config):
    _check_experts(case, None, torch.float32, 1e-4, gemv_config=config)


def test_token_by_token_path_takes_the_measured_configuration(monkeypatch):
    """A shape in this GPU's table runs its measured configuration; others, and fp8 experts, the default."""
    chosen = MoeGemvConfig(8, 128, 4, 16, 64, 4)
    device = torch.device("cuda", 0)
    monkeypatch.setattr(fused_moe_configs, "_device_name", lambda index: "some GPU")
    monkeypatch.setitem(fused_moe_configs.TUNED_GEMV, "some GPU", {(16, 64, 48, 2, 4): chosen})
    assert fused_moe_configs.moe_gemv_config(16, 4, 64, 48, torch.bfloat16, device) == chosen
    assert fused_moe_configs.moe_gemv_config(16, 2, 64, 48, torch.bfloat16, device) == fused_moe_configs.DEFAULT_GEMV
    fp8_config = fused_moe_configs.moe_gemv_config(16, 4, 64, 48, torch.float8_e4m3fn, device)
    assert fp8_config == fused_moe_configs.DEFAULT_GEMV
    assert fused_moe_configs.moe_gemv_config(16, 4, 64, 48, torch.bfloat16, torch.device("cpu")) == \
        fused_moe_configs.DEFAULT_GEMV


def test_default_configs_give_the_product():
    """The heuristic's configurations at decode and prefill token counts."""
    for num_tokens in (1, 64, 600):
        config = fused_moe_configs.default_config(num_tokens, 8, 2, 4)
        _check_experts((min(num_tokens, 70), 32, 48, 8, 2, "random", False), config, torch.float32, 1e-4)


_TABLE_CONFIGS = sorted({c for table in fused_moe_configs.TUNED.values() for by_shape in table.values()
                         for c in by_shape.values()})


@pytest.mark.parametrize("config", _TABLE_CONFIGS, ids=str)
def test_measured_configs_give_the_product(config):
    """Every configuration of the measured table computes the right result (on a small shape)."""
    _check_experts((20, 64, 48, 8, 2, "hot", False), config, torch.float16, 3e-2)


@needs_cuda
@pytest.mark.parametrize("num_tokens,summed", [(2, False), (8, False), (8, True), (40, True)])
def test_fused_experts_replays_in_a_cuda_graph(num_tokens, summed):
    """Captured once, replayed with new routing and inputs: the same result as eager (no host
    sync, nothing sized by the routing), the top-k sum in the down GEMM (`summed`) included."""
    hidden, inter, num_experts, top_k = 256, 128, 32, 4
    w13, w2 = (w.cuda() for w in _weights(num_experts, hidden, inter, torch.bfloat16, seed=5))
    x = torch.randn(num_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    weights = torch.rand(num_tokens, top_k, device="cuda")
    ids = _routing(num_tokens, top_k, num_experts, "random", 1).cuda()
    counters = new_sum_counters(num_tokens, hidden, x.device) if summed else None
    fused_experts(x, w13, w2, weights, ids, sum_counters=counters)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_experts(x, w13, w2, weights, ids, sum_counters=counters)
    for seed, kind in ((2, "hot"), (3, "few"), (4, "random")):
        ids.copy_(_routing(num_tokens, top_k, num_experts, kind, seed))
        x.normal_()
        weights.uniform_()
        graph.replay()
        torch.testing.assert_close(out, fused_experts(x, w13, w2, weights, ids, sum_counters=counters),
                                   rtol=0, atol=0)
        if summed:
            torch.testing.assert_close(out, fused_experts(x, w13, w2, weights, ids), rtol=1e-2, atol=1e-2)


@needs_cuda
@pytest.mark.parametrize("num_tokens", [1, 10, 64, 300, 2048])
@pytest.mark.parametrize("shape", [(128, 2048, 768, 8), (256, 3072, 1536, 8), (8, 4096, 14336, 2)],
                         ids=["qwen3-30b-a3b", "minimax-m2", "mixtral-8x7b"])
def test_fused_experts_at_real_shapes_bf16(shape, num_tokens):
    """The default configurations at the served models' expert shapes (one layer, TP=1), bf16,
    against the float32 reference on the same bf16 values."""
    num_experts, hidden, inter, top_k = shape
    torch.manual_seed(num_tokens)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden ** 0.5).bfloat16()
    w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter ** 0.5).bfloat16()
    x = torch.randn(num_tokens, hidden, device="cuda").bfloat16()
    weights, ids = torch.rand(num_tokens, num_experts, device="cuda").topk(top_k, dim=-1)
    ids = ids.to(torch.int32)
    out = fused_experts(x, w13, w2, weights, ids)
    expert_map = torch.arange(num_experts, dtype=torch.int32, device="cuda")
    ref = experts_ref(x.float(), w13.float(), w2.float(), weights, ids, expert_map)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, rel
