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


def _sample(metrics: ServerMetrics, series: str) -> float:
    """One rendered sample, e.g. 'vllm:request_prompt_tokens_count'."""
    for line in metrics.render().decode().splitlines():
        if line.startswith(series + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not rendered")


def test_vllm_names_and_the_per_request_series():
    from tokenmill.engine.async_engine import RequestTiming
    m = ServerMetrics("m", prefix="vllm", max_model_len=4096)
    text = m.render().decode()
    assert "vllm:num_requests_running" in text and "tokenmill:" not in text
    timing = RequestTiming(arrival=10.0, submitted=10.5, first_token=11.0, last_token=13.0, finished=13.0,
                           num_prompt_tokens=30, num_generation_tokens=3, finish_reason="length",
                           inter_token_latencies=[1.5, 0.5])
    m.on_request_finished(timing)
    assert _sample(m, "vllm:inter_token_latency_seconds_count") == 2
    assert _sample(m, "vllm:inter_token_latency_seconds_sum") == 2.0
    assert _sample(m, "vllm:request_prefill_time_seconds_sum") == 0.5
    assert _sample(m, "vllm:request_decode_time_seconds_sum") == 2.0
    assert _sample(m, "vllm:request_prompt_tokens_sum") == 30
    assert _sample(m, "vllm:request_generation_tokens_sum") == 3
    # 1-2-5 buckets up to max_model_len: 30 prompt tokens land in the le=50 bucket, not le=20.
    assert 'vllm:request_prompt_tokens_bucket{le="20.0",model_name="m"} 0.0' in m.render().decode()
    assert 'vllm:request_prompt_tokens_bucket{le="50.0",model_name="m"} 1.0' in m.render().decode()
    assert 'le="2000.0"' in m.render().decode() and 'le="5000.0"' not in m.render().decode()

    m.on_scheduler_stats(SchedulerStats(num_prompt_tokens=100, num_generation_tokens=4))
    m.on_scheduler_stats(SchedulerStats())  # an idle heartbeat is not a step
    assert _sample(m, "vllm:iteration_tokens_total_count") == 1
    assert _sample(m, "vllm:iteration_tokens_total_sum") == 104

    m.set_cache_config(block_size=16, num_gpu_blocks=1024, cache_dtype="bfloat16", enable_prefix_caching=True)
    assert ('vllm:cache_config_info{block_size="16",cache_dtype="bfloat16",enable_prefix_caching="True",'
            'num_gpu_blocks="1024"} 1.0') in m.render().decode()


def test_unknown_metrics_prefix_is_refused():
    import pytest
    with pytest.raises(ValueError, match="tokenmill, vllm"):
        ServerMetrics("m", prefix="other")
