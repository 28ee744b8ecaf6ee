"""KV blocks behind a sliding window are freed as requests advance: bounded memory per request,
no block leaked, prefix caching still consistent. Scheduler + KV manager with a fake runner."""

from __future__ import annotations

import pytest

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import FREED_BLOCK_ID, KVCacheManager
from tokenmill.core.request import Request
from tokenmill.core.scheduler import Scheduler
from tokenmill.sampling_params import SamplingParams

from test_scheduler import FakeRunner, step  # noqa: E402


def make(num_blocks: int, block_size: int, window: int | None, budget: int = 512, caching: bool = False,
         max_len: int = 1 << 16) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, caching, sliding_window=window)
    return Scheduler(SchedulerConfig(8, budget, "fcfs", max_len), kv)


def request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=0.0)


def blocks_held_at(sched: Scheduler, rid: str, num_tokens: int) -> int:
    """Run to completion; the blocks the request held when its context reached `num_tokens`."""
    runner = FakeRunner(sched)
    held = None
    while sched.has_unfinished_requests():
        step(sched, runner)
        if rid in sched.requests and sched.requests[rid].num_computed_tokens == num_tokens:
            held = sched.kv.num_held_blocks(rid)
    return held


@pytest.mark.parametrize("window,expected", [(None, 1024), (4096, 256)])
def test_blocks_held_at_16k_tokens(window, expected):
    """The docs/models.md figure: a 1k-token prompt generating past 16k tokens, 16-token blocks.
    At 16,384 tokens of context full attention holds all 1,024 blocks; a 4k window holds the
    256 blocks its next query can reach (the 4,096 keys before it end on a block boundary here)."""
    sched = make(1100, 16, window, budget=1024)
    sched.add_request(request("r", list(range(1, 1025)), 16384 - 1024 + 8))
    assert blocks_held_at(sched, "r", 16384) == expected
    sched.kv.pool.check_invariants()
    assert sched.kv.pool.num_free_blocks == 1100


@pytest.mark.parametrize("block_size,window", [(4, 7), (16, 5), (8, 64)])
def test_window_bounds_blocks_under_chunked_prefill(block_size, window):
    """A long prompt in small chunks, then decoding: at any step the request holds at most the
    blocks its window can reach plus the ones the step fills."""
    budget = 24
    sched = make(200, block_size, window, budget=budget)
    sched.add_request(request("r", list(range(1, 301)), 200))
    runner = FakeRunner(sched)
    bound = -(-(window - 1 + budget) // block_size) + 1
    while sched.has_unfinished_requests():
        step(sched, runner)
        if "r" in sched.kv.req_blocks:
            assert sched.kv.num_held_blocks("r") <= bound
    sched.kv.pool.check_invariants()
    assert sched.kv.pool.num_free_blocks == 200


def test_freed_positions_reach_the_runner_as_placeholders():
    """The runner's table keeps one column per block position; freed ones carry FREED_BLOCK_ID
    (a prefix hit whose head is behind the window is freed at once)."""
    sched = make(64, 4, 6, caching=True)
    prompt = list(range(1, 41))
    sched.add_request(request("a", prompt, 1))
    runner = FakeRunner(sched)
    while sched.has_unfinished_requests():
        step(sched, runner)
    sched.add_request(request("b", prompt + [99], 1))
    out = sched.schedule()
    new = out.new_requests[0]
    assert new.num_computed_tokens == 40  # hit on all ten prompt blocks
    ids = new.block_ids
    # The first query is at 40: keys > 34 only, so blocks 0..7 (tokens < 32) are freed.
    assert ids[:8] == [FREED_BLOCK_ID] * 8 and all(b >= 0 for b in ids[8:])
    assert sched.kv.num_held_blocks("b") == len(ids) - 8


def test_preemption_and_finish_free_everything():
    sched = make(8, 4, 9, budget=16)
    for i in range(4):
        sched.add_request(request(f"r{i}", list(range(1 + i, 30 + i)), 40))
    runner = FakeRunner(sched)
    while sched.has_unfinished_requests():
        step(sched, runner)
        sched.kv.pool.check_invariants()
    assert sched.num_preemptions > 0
    assert sched.kv.pool.num_free_blocks == 8
    assert not sched.kv.req_blocks and not sched.kv._num_freed
