"""ServerMetrics turns the core's cumulative prefix-cache counts into counter increments and logs
the hit rate of each interval."""

from __future__ import annotations

from tokenmill.core.messages import SchedulerStats
from tokenmill.entrypoints.server.metrics import ServerMetrics


def _value(metrics: ServerMetrics, name: str) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith(f"tokenmill:{name}{{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not rendered")


def test_prefix_cache_counters_and_interval_hit_rate():
    m = ServerMetrics("m")
    m.on_scheduler_stats(SchedulerStats(num_running_reqs=1, prefix_cache_queries=100, prefix_cache_hits=0,
                                        num_prompt_tokens=100))
    assert "Prefix cache hit rate: 0.0%" in m.log_line()
    # Cumulative 400 / 240 from the core: this interval looked up 300 tokens and found 240.
    m.on_scheduler_stats(SchedulerStats(num_running_reqs=1, prefix_cache_queries=400, prefix_cache_hits=240,
                                        num_prompt_tokens=60))
    assert "Prefix cache hit rate: 80.0%" in m.log_line()
    assert _value(m, "prefix_cache_queries_total") == 400
    assert _value(m, "prefix_cache_hits_total") == 240
    # A repeated snapshot adds nothing.
    m.on_scheduler_stats(SchedulerStats(prefix_cache_queries=400, prefix_cache_hits=240))
    assert _value(m, "prefix_cache_hits_total") == 240
    assert m.log_line() is None  # idle: no line
