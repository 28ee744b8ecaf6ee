"""Scheduler invariants with a fake model runner: budgets, caps, chunking, preemption, aborts."""

from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.config import SchedulerConfig
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.request import Request, RequestStatus
from tokenmill.core.scheduler import Scheduler
from tokenmill.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tokenmill.sampling_params import SamplingParams


def make_scheduler(num_blocks=64, block_size=4, max_seqs=8, budget=32, max_len=256,
                   policy="fcfs", caching=False) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size, caching)
    return Scheduler(SchedulerConfig(max_seqs, budget, policy, max_len), kv)


def make_request(rid, prompt_len, max_tokens=4, priority=0, arrival=0.0, **params) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **params),
                   arrival_time=arrival, eos_token_id=0, priority=priority)


class FakeRunner:
    """Samples token 5 for every request whose scheduled tokens reach the end of its known tokens."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.progress: dict[str, int] = {}

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        result = ModelRunnerOutput()
        for rid, n in out.num_scheduled_tokens.items():
            req = self.sched.requests[rid]
            # (`schedule` already counted the step's tokens as computed.)
            if req.num_computed_tokens >= req.num_tokens:
                result.sampled_token_ids[rid] = 5
        return result


def step(sched: Scheduler, runner: FakeRunner):
    out = sched.schedule()
    return out, sched.update(out, runner.execute(out))


def run_to_completion(sched: Scheduler, max_steps=1000) -> dict:
    runner = FakeRunner(sched)
    finished = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        out, outputs = step(sched, runner)
        assert out.total_num_scheduled_tokens <= sched.config.max_num_batched_tokens
        assert len(sched.running) <= sched.config.max_num_seqs
        for o in outputs:
            if o.finish_reason is not None:
                finished[o.request_id] = o
    return finished


def test_chunked_prefill_respects_budget():
    sched = make_scheduler(budget=10)
    sched.add_request(make_request("a", 25, max_tokens=2))
    runner = FakeRunner(sched)
    sizes = []
    for _ in range(3):
        out, _ = step(sched, runner)
        sizes.append(out.num_scheduled_tokens["a"])
    assert sizes == [10, 10, 5]
    assert sched.requests["a"].num_output_tokens == 1


def test_decodes_first_then_waiting_under_seq_cap():
    sched = make_scheduler(max_seqs=2, budget=100)
    for i in range(3):
        sched.add_request(make_request(f"r{i}", 5, max_tokens=3))
    out = sched.schedule()
    assert set(out.num_scheduled_tokens) == {"r0", "r1"}


def test_all_finish_and_no_block_leaks():
    sched = make_scheduler(num_blocks=20, block_size=4, max_seqs=4, budget=16)
    for i in range(10):
        sched.add_request(make_request(f"r{i}", 7 + i, max_tokens=6))
    finished = run_to_completion(sched)
    assert len(finished) == 10
    assert all(str(o.finish_reason) == "length" for o in finished.values())
    assert sched.kv.pool.num_free_blocks == 20
    sched.kv.pool.check_invariants()


def test_preemption_when_pool_runs_dry():
    # 6 blocks of 4 tokens: two requests of 9 prompt + 8 output tokens cannot both fit.
    sched = make_scheduler(num_blocks=6, block_size=4, max_seqs=4, budget=64)
    sched.add_request(make_request("a", 9, max_tokens=8))
    sched.add_request(make_request("b", 9, max_tokens=8))
    finished = run_to_completion(sched)
    assert set(finished) == {"a", "b"}
    assert sched.num_preemptions > 0
    assert sched.kv.pool.num_free_blocks == 6


def test_priority_policy_orders_and_preempts_lowest_priority():
    sched = make_scheduler(max_seqs=1, budget=100, policy="priority")
    sched.add_request(make_request("low", 4, priority=5, arrival=0.0))
    sched.add_request(make_request("high", 4, priority=0, arrival=1.0))
    out = sched.schedule()
    assert list(out.num_scheduled_tokens) == ["high"]
    sched2 = make_scheduler(num_blocks=5, block_size=4, max_seqs=4, budget=64, policy="priority")
    sched2.add_request(make_request("urgent", 8, max_tokens=8, priority=0, arrival=1.0))
    sched2.add_request(make_request("bulk", 8, max_tokens=8, priority=9, arrival=0.0))
    runner = FakeRunner(sched2)
    preempted = set()
    while sched2.has_unfinished_requests():
        out, _ = step(sched2, runner)
        preempted |= out.preempted_request_ids
    assert preempted == {"bulk"}


def test_abort_frees_blocks_anywhere():
    sched = make_scheduler(num_blocks=10, budget=8)
    sched.add_request(make_request("run", 6, max_tokens=50))
    sched.add_request(make_request("wait", 6, max_tokens=50))
    runner = FakeRunner(sched)
    step(sched, runner)
    sched.finish_requests(["run", "wait", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert sched.kv.pool.num_free_blocks == 10
    assert sched.schedule().finished_request_ids == {"run", "wait"}


def test_stop_conditions():
    sched = make_scheduler()
    sched.add_request(make_request("eos", 3, max_tokens=10))
    runner = FakeRunner(sched)
    out = sched.schedule()
    outputs = sched.update(out, ModelRunnerOutput(sampled_token_ids={"eos": 0}))
    assert str(outputs[0].finish_reason) == "stop"
    sched.add_request(make_request("min", 3, max_tokens=10, min_tokens=2, stop_token_ids=[9]))
    out = sched.schedule()
    outputs = sched.update(out, ModelRunnerOutput(sampled_token_ids={"min": 9}))
    assert outputs[0].finish_reason is None  # min_tokens not reached
    out = sched.schedule()
    outputs = sched.update(out, ModelRunnerOutput(sampled_token_ids={"min": 9}))
    assert str(outputs[0].finish_reason) == "stop" and outputs[0].stop_reason == 9
    del runner


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step"]),
                          st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=50),
       st.sampled_from(["fcfs", "priority"]), st.booleans())
def test_random_arrivals_and_aborts_never_leak(ops, policy, caching):
    sched = make_scheduler(num_blocks=16, block_size=4, max_seqs=3, budget=12, max_len=64, policy=policy,
                           caching=caching)
    runner = FakeRunner(sched)
    n = 0
    for op, a, b in ops:
        if op == "add":
            n += 1
            req = make_request(f"r{n}", a, max_tokens=b, priority=a % 3, arrival=float(n))
            sched.add_request(req)  # prompts 1..a: many share prefixes, so caching hits
        elif op == "abort" and sched.requests:
            rid = sorted(sched.requests)[a % len(sched.requests)]
            sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        else:
            out, _ = step(sched, runner)
            assert out.total_num_scheduled_tokens <= 12
        sched.kv.pool.check_invariants()
        in_use = {b.block_id for r in sched.running for b in sched.kv.req_blocks.get(r.request_id, [])}
        assert len(in_use) == sched.kv.pool.num_blocks - sched.kv.pool.num_free_blocks
    run_to_completion(sched)
    assert sched.kv.pool.num_free_blocks == 16
    assert not sched.requests


class AsyncStepper:
    """Async scheduling's order: schedule and launch step N+1, then update with step N's tokens."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.runner = FakeRunner(sched)
        self.in_flight = None

    def step(self):
        out = self.sched.schedule()
        launched = (out, self.runner.execute(out))  # the fake "samples" when the step launches
        outputs = self.sched.update(*self.in_flight) if self.in_flight else []
        self.in_flight = None if out.is_empty else launched
        return out, outputs


def test_async_in_flight_token_accounting():
    sched = make_scheduler(budget=64)
    sched.add_request(make_request("a", 6, max_tokens=4))
    stepper = AsyncStepper(sched)
    scheduled = []
    finished = {}
    while sched.has_unfinished_requests() or stepper.in_flight:
        out, outputs = stepper.step()
        scheduled.append(out.num_scheduled_tokens.get("a", 0))
        finished.update({o.request_id: o for o in outputs if o.finish_reason is not None})
        req = sched.requests.get("a")
        if req is not None:  # one sampled token is always in flight between steps
            assert req.num_inflight_tokens == 1
            assert req.num_computed_tokens == req.num_tokens  # its in-flight token's input included
    # The prompt, then three one-token steps; the step that would follow the 4th token is never
    # scheduled (its in-flight token reaches max_tokens), and nothing is computed twice.
    assert scheduled[:4] == [6, 1, 1, 1] and sum(scheduled) == 9
    assert str(finished["a"].finish_reason) == "length"
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step", "step"]),
                          st.integers(1, 30), st.integers(1, 12)), min_size=1, max_size=60),
       st.sampled_from(["fcfs", "priority"]), st.booleans())
def test_async_random_arrivals_aborts_and_preemptions(ops, policy, caching):
    """Preemption and abort while a step is in flight: no leak, and every request that was not
    aborted ends with exactly its max_tokens (the fake never samples EOS)."""
    sched = make_scheduler(num_blocks=12, block_size=4, max_seqs=3, budget=12, max_len=64, policy=policy,
                           caching=caching)
    stepper = AsyncStepper(sched)
    wanted, aborted, finished, num_out = {}, set(), {}, {}

    def collect(outputs):
        for o in outputs:
            num_out[o.request_id] = num_out.get(o.request_id, 0) + len(o.new_token_ids)
            if o.finish_reason is not None:
                finished[o.request_id] = o
    for op, a, b in ops:
        if op == "add":
            rid = f"r{len(wanted)}"
            wanted[rid] = b
            sched.add_request(make_request(rid, a, max_tokens=b, priority=a % 3, arrival=float(len(wanted))))
        elif op == "abort" and sched.requests:
            rid = sorted(sched.requests)[a % len(sched.requests)]
            sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
            aborted.add(rid)
        else:
            out, outputs = stepper.step()
            assert out.total_num_scheduled_tokens <= 12
            collect(outputs)
        sched.kv.pool.check_invariants()
        for r in sched.requests.values():
            assert 0 <= r.num_inflight_tokens <= 1
    while sched.has_unfinished_requests() or stepper.in_flight:
        collect(stepper.step()[1])
    assert sched.kv.pool.num_free_blocks == 12
    assert not sched.requests
    assert set(finished) == set(wanted) - aborted
    for rid, out in finished.items():
        assert str(out.finish_reason) == "length" and num_out[rid] == wanted[rid]
