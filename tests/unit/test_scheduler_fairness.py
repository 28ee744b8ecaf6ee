"""A long prompt being prefilled in chunks does not stall the others: requests that arrive
meanwhile start, and running ones keep decoding (docs/reliability.md, "one long prompt")."""

from test_scheduler import FakeRunner, make_request, make_scheduler, run_to_completion, step


def test_a_short_request_runs_beside_a_long_prefill():
    sched = make_scheduler(num_blocks=512, block_size=4, budget=32, max_len=1024)
    runner = FakeRunner(sched)
    sched.add_request(make_request("long", 900, max_tokens=2))
    step(sched, runner)  # the long prompt is running, mid-prefill
    sched.add_request(make_request("short", 8, max_tokens=3))
    out, _ = step(sched, runner)
    # Half the budget for the waiting request: it is prefilled in this step...
    assert out.num_scheduled_tokens == {"long": 16, "short": 8}
    finished_at = None
    for n in range(2, 10):
        out, outputs = step(sched, runner)
        # ...and decodes in every step after it, beside the long prompt's chunks.
        assert out.num_scheduled_tokens["short"] == 1 and out.num_scheduled_tokens["long"] == 31
        if any(o.request_id == "short" and o.finish_reason is not None for o in outputs):
            finished_at = n
            break
    assert finished_at is not None and sched.requests["long"].num_computed_tokens < 900


def test_alone_a_long_prompt_uses_the_whole_budget():
    sched = make_scheduler(num_blocks=512, block_size=4, budget=32, max_len=1024)
    runner = FakeRunner(sched)
    sched.add_request(make_request("long", 900, max_tokens=2))
    for _ in range(3):
        out, _ = step(sched, runner)
        assert out.num_scheduled_tokens["long"] == 32
    assert run_to_completion(sched)["long"].finish_reason is not None
