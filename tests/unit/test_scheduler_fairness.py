"""A long prompt being prefilled in chunks leaves room for requests that arrive meanwhile
(docs/reliability.md, "one long prompt stalls everyone")."""

from test_scheduler import FakeRunner, make_request, make_scheduler, step


def test_a_waiting_request_starts_while_a_long_prompt_is_prefilled():
    sched = make_scheduler(num_blocks=512, block_size=4, budget=32, max_len=1024)
    runner = FakeRunner(sched)
    sched.add_request(make_request("long", 900, max_tokens=2))
    step(sched, runner)  # the long prompt is running, mid-prefill
    sched.add_request(make_request("short", 8, max_tokens=2))
    out, _ = step(sched, runner)
    # Without the cap the long prompt's chunk takes the whole budget and "short" waits ~28 steps.
    assert out.num_scheduled_tokens["long"] == 16
    assert out.num_scheduled_tokens["short"] == 8
    assert sched.requests["short"].num_computed_tokens == 8


def test_alone_a_long_prompt_uses_the_whole_budget():
    sched = make_scheduler(num_blocks=512, block_size=4, budget=32, max_len=1024)
    runner = FakeRunner(sched)
    sched.add_request(make_request("long", 900, max_tokens=2))
    for _ in range(3):
        out, _ = step(sched, runner)
        assert out.num_scheduled_tokens["long"] == 32
