"""After new weights, no KV block computed before them is ever found by a prefix lookup: free cached
blocks are forgotten, requests running across the reset never publish their blocks (theirs mix old
and new K/V), requests starting afterwards cache normally; `preempt_all` (sleep) sends every
running request back to the queue and tells the runner."""

from test_block_pool import _run_prefill, make_request
from test_scheduler import FakeRunner, make_scheduler, step

from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import RequestStatus

PREFIX = list(range(100, 112))  # three full blocks of 4


def test_reset_forgets_free_cached_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_caching=True)
    first = make_request("a", PREFIX + [1])
    _run_prefill(kv, first)
    kv.free(first)
    assert _run_prefill(kv, make_request("b", PREFIX + [2])) == 12  # cached before the reset
    kv.reset_prefix_cache()
    assert kv.pool.cached == {} and all(b.block_hash is None for b in kv.pool.blocks)
    assert _run_prefill(kv, make_request("c", PREFIX + [3])) == 0
    kv.pool.check_invariants()


def test_request_running_across_reset_never_publishes():
    kv = KVCacheManager(num_blocks=32, block_size=4, enable_caching=True)
    old = make_request("old", PREFIX[:6])  # one full block published, one partial
    _run_prefill(kv, old)
    kv.reset_prefix_cache()
    # It keeps running on its blocks and fills more after the reset: none may become a hit.
    old.all_token_ids.extend(PREFIX[6:12])
    assert kv.allocate_slots(old, 6) is not None
    kv.cache_full_blocks(old, 12)
    old.num_computed_tokens = 12
    assert kv.pool.cached == {}
    probe = make_request("probe", PREFIX + [9])
    assert kv.get_computed_blocks(probe) == ([], 0)
    kv.free(old)
    assert kv.get_computed_blocks(probe) == ([], 0)
    # A request that starts after the reset publishes as usual.
    new = make_request("new", PREFIX + [5])
    assert _run_prefill(kv, new) == 0
    assert _run_prefill(kv, make_request("again", PREFIX + [6])) == 12
    kv.pool.check_invariants()


def test_preempt_all_requeues_running_requests_in_order():
    sched = make_scheduler(num_blocks=64, block_size=4, budget=64, caching=True)
    for i in range(3):
        sched.add_request(_request(f"r{i}"))
    runner = FakeRunner(sched)
    step(sched, runner)
    assert len(sched.running) == 3
    sched.preempt_all()
    assert sched.running == [] and [r.request_id for r in sched.waiting] == ["r0", "r1", "r2"]
    assert all(r.status == RequestStatus.PREEMPTED and r.num_computed_tokens == 0 for r in sched.requests.values())
    assert sched.kv.pool.num_free_blocks == 64
    out = sched.schedule()
    assert out.preempted_request_ids == {"r0", "r1", "r2"}  # the runner drops its state first
    assert {n.request_id for n in out.new_requests} == {"r0", "r1", "r2"}  # then takes them anew


def _request(rid):
    from test_scheduler import make_request as scheduler_request
    return scheduler_request(rid, 10, max_tokens=5)


def test_reset_drops_state_checkpoints_and_running_requests_take_none():
    """Hybrid models: a state checkpoint stored before the reset is never restored, and a request
    running across the reset (its state mixes old and new weights) stores no checkpoint after it;
    one that starts afterwards does."""
    from test_state_cache import make, request

    sched = make(8, budget=24)
    doc = list(range(100, 164))  # boundaries at 16, 32, 48
    runner = FakeRunner(sched)
    sched.add_request(request("a", doc[:20], max_tokens=1))
    step(sched, runner)
    step(sched, runner)  # a's checkpoint at 16 is written and published
    sched.add_request(request("long", doc + [1], max_tokens=1))
    out = sched.schedule()  # first chunk of 24 tokens: hits a's checkpoint at 16
    assert {n.request_id: n.num_computed_tokens for n in out.new_requests} == {"long": 16}
    sched.update(out, runner.execute(out))
    sched.kv.reset_prefix_cache()
    assert sched.kv.states.pool.cached == {}
    while sched.has_unfinished_requests():  # its later chunks cross 32 and 48: no checkpoint taken
        out, _ = step(sched, runner)
        assert "long" not in out.state_checkpoints
    sched.add_request(request("fresh", doc[:40] + [2], max_tokens=1))
    out = sched.schedule()
    assert out.new_requests[0].num_computed_tokens == 0  # nothing from before the reset
    assert out.state_checkpoints["fresh"]  # a request started after the reset checkpoints again
    sched.kv.states.pool.check_invariants()
