"""State slots of hybrid models in the scheduler (fake runner): a request runs only with a slot,
preemption and finishing return it, checkpoints are published only for steps that run and become
hits only once written, and a prefix hit never reaches past the last checkpoint."""

from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.state_cache import NO_SLOT, StateCache
from tokenmill.sampling_params import SamplingParams

from test_scheduler import FakeRunner, step  # noqa: E402


def make(num_slots: int, max_seqs: int = 4, num_blocks: int = 64, caching: bool = True, interval: int = 16,
         budget: int = 64) -> Scheduler:
    states = StateCache(num_slots, interval, caching, max_seqs)
    kv = KVCacheManager(num_blocks, 4, caching, states=states)
    return Scheduler(SchedulerConfig(max_seqs, budget, "fcfs", 1024), kv)


def request(rid: str, prompt: list[int], max_tokens: int = 3) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), arrival_time=0.0)


def test_a_request_runs_only_with_a_slot():
    """Two slots, caching off: the third request waits although blocks and sequences are free."""
    sched = make(2, caching=False)
    for i in range(3):
        sched.add_request(request(f"r{i}", list(range(10 * i, 10 * i + 5))))
    out = sched.schedule()
    assert sorted(n.request_id for n in out.new_requests) == ["r0", "r1"]
    assert sorted(n.state_slot for n in out.new_requests) == [0, 1]
    runner = FakeRunner(sched)
    sched.update(out, runner.execute(out))
    finished = set()
    while sched.has_unfinished_requests():
        out, outputs = step(sched, runner)
        finished |= {o.request_id for o in outputs if o.finish_reason is not None}
    assert finished == {"r0", "r1", "r2"}
    assert not sched.kv.states.working and sched.kv.states.pool.num_free_blocks == 2


def test_preemption_returns_the_slot_and_resumes_with_a_new_one():
    sched = make(4, num_blocks=9, caching=False, budget=32)
    for i in range(3):
        sched.add_request(request(f"r{i}", list(range(10 * i, 10 * i + 10)), max_tokens=12))
    runner = FakeRunner(sched)
    while sched.has_unfinished_requests():
        step(sched, runner)
        states = sched.kv.states
        assert set(states.working) == {r.request_id for r in sched.running}
        states.pool.check_invariants()
    assert sched.num_preemptions > 0
    assert sched.kv.states.pool.num_free_blocks == 4


def test_checkpoints_published_with_the_step_and_hit_after_it():
    sched = make(8)
    doc = list(range(100, 140))  # 40 tokens: boundaries at 16 and 32
    sched.add_request(request("a", doc + [1], max_tokens=1))
    # Scheduled in the same step as a: a's KV blocks are published, but its state checkpoints are
    # not written yet, so b gets no hit at all.
    sched.add_request(request("b", doc + [2], max_tokens=1))
    out = sched.schedule()
    slots = out.state_checkpoints["a"]
    assert len(slots) == 2 and NO_SLOT not in slots
    news = {n.request_id: n for n in out.new_requests}
    assert news["b"].num_computed_tokens == 0 and news["b"].restore_state_from == NO_SLOT
    runner = FakeRunner(sched)
    sched.update(out, runner.execute(out))
    # In a later step the checkpoint at 32 is a hit (33 of c's tokens are the document's); a
    # salted request does not see it.
    sched.add_request(request("c", doc[:35] + [3], max_tokens=1))
    salted = request("d", doc + [4], max_tokens=1)
    salted.cache_salt = "tenant"
    sched.add_request(salted)
    out = sched.schedule()
    news = {n.request_id: n for n in out.new_requests}
    assert news["c"].num_computed_tokens == 32 and news["c"].restore_state_from == slots[1]
    assert news["d"].num_computed_tokens == 0 and news["d"].restore_state_from == NO_SLOT


def test_a_checkpoint_of_a_step_that_does_not_run_is_withdrawn():
    """A request preempted while its step is being scheduled: the checkpoints that step would
    have written are unpublished and their slots returned."""
    sched = make(8)
    kv = sched.kv
    r = request("a", list(range(40)))
    sched.add_request(r)
    out = sched.schedule()
    assert out.state_checkpoints["a"]
    published = [kv.states.pool.blocks[s] for s in out.state_checkpoints["a"]]
    sched._preempt(r, out)
    assert "a" not in out.state_checkpoints
    assert all(b.block_hash is None and b.ref_cnt == 0 for b in published)
    kv.states.pool.check_invariants()
    assert kv.states.pool.num_free_blocks == 8


def test_checkpoints_leave_slots_for_requests_that_may_start():
    """With 5 slots and room for 4 running requests, one running request may take only 1
    checkpoint slot beyond the 4 it must leave (its own working slot included)."""
    sched = make(5, max_seqs=4, budget=128)
    sched.add_request(request("a", list(range(100))))
    out = sched.schedule()
    taken = [s for s in out.state_checkpoints["a"] if s != NO_SLOT]
    assert len(taken) == 1
