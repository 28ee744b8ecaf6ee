"""Prometheus metrics (vLLM's names, with a `tokenmill:` prefix or, for vLLM's dashboards and
alerts, `--metrics-prefix vllm`) and the periodic one-line log.

One `CollectorRegistry` per server, not the global one, so several apps in one process (tests)
never collide. `ServerMetrics` is the `AsyncEngine`'s `StatsListener`. Per-request series
(latencies, token counts) are observed when a request finishes.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from tokenmill.engine.async_engine import RequestTiming
from tokenmill.core.messages import SchedulerStats

logger = logging.getLogger("tokenmill.server")
disable_created_metrics()  # `*_created` series double the output and nobody graphs them

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
METRICS_PREFIXES = ("tokenmill", "vllm")


def token_count_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's 1-2-5 series (1, 2, 5, 10, 20, 50, ...) up to `max_value`."""
    buckets, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10 ** exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class ServerMetrics:
    """Args:
        model_name: the `model_name` label of every series.
        prefix: `tokenmill` or `vllm` (the names after the colon are vLLM's either way).
        max_model_len: the top bucket of the per-request token-count histograms.
    """

    def __init__(self, model_name: str = "", prefix: str = "tokenmill", max_model_len: int = 8192) -> None:
        if prefix not in METRICS_PREFIXES:
            raise ValueError(f"metrics prefix must be one of {', '.join(METRICS_PREFIXES)}, got {prefix!r}")
        self.prefix = prefix
        self.registry = CollectorRegistry()
        r, label = self.registry, {"model_name": model_name}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"{prefix}:{name}", doc, ["model_name"], registry=r).labels(**label)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{prefix}:{name}", doc, ["model_name"], registry=r).labels(**label)

        def histogram(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(f"{prefix}:{name}", doc, ["model_name"], buckets=buckets,
                             registry=r).labels(**label)

        self.running = gauge("num_requests_running", "Requests in the engine's running batch.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).")
        self.preemptions = counter("num_preemptions", "Requests preempted (KV blocks reclaimed).")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens computed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.ttft = histogram("time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds", "Mean time between output tokens.",
                              _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue_time = histogram("request_queue_time_seconds",
                                    "Arrival to hand-off to the engine core (admission + tokenization).",
                                    _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between successive outputs of a request.",
                             _TOKEN_LATENCY_BUCKETS)
        self.prefill_time = histogram("request_prefill_time_seconds",
                                      "Hand-off to the engine core to first token (waiting in the core "
                                      "included).", _LATENCY_BUCKETS)
        self.decode_time = histogram("request_decode_time_seconds", "First token to last token.",
                                     _LATENCY_BUCKETS)
        counts = token_count_buckets(max_model_len)
        self.request_prompt_tokens = histogram("request_prompt_tokens", "Prompt tokens per request.", counts)
        self.request_generation_tokens = histogram("request_generation_tokens",
                                                   "Generated tokens per request (all n samples).", counts)
        self.iteration_tokens = histogram("iteration_tokens_total", "Tokens computed per engine step.",
                                          _ITERATION_TOKEN_BUCKETS)
        self._success = Counter(f"{prefix}:request_success", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._model_name = model_name
        # Cumulative values from the core, to turn into counter increments.
        self._last_preemptions = self._last_queries = self._last_hits = 0
        # For the periodic log.
        self.last_stats = SchedulerStats()
        self._log_prompt_tokens = self._log_generation_tokens = 0
        self._log_queries = self._log_hits = 0  # prefix-cache tokens since the last log line
        self._log_time = time.monotonic()

    def set_cache_config(self, **info: object) -> None:
        """`cache_config_info`: a gauge of 1 whose labels are the KV cache's configuration."""
        labels = {k: str(v) for k, v in info.items()}
        Gauge(f"{self.prefix}:cache_config_info", "Information of the KV cache configuration.",
              sorted(labels), registry=self.registry).labels(**labels).set(1)

    # ----- StatsListener -----
    def on_scheduler_stats(self, stats: SchedulerStats) -> None:
        self.last_stats = stats
        self.running.set(stats.num_running_reqs)
        self.waiting.set(stats.num_waiting_reqs)
        self.kv_usage.set(stats.kv_cache_usage)
        self.preemptions.inc(max(0, stats.num_preemptions - self._last_preemptions))
        new_queries = max(0, stats.prefix_cache_queries - self._last_queries)
        new_hits = max(0, stats.prefix_cache_hits - self._last_hits)
        self.prefix_queries.inc(new_queries)
        self.prefix_hits.inc(new_hits)
        self._log_queries += new_queries
        self._log_hits += new_hits
        self._last_preemptions = stats.num_preemptions
        self._last_queries = stats.prefix_cache_queries
        self._last_hits = stats.prefix_cache_hits
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        step_tokens = stats.num_prompt_tokens + stats.num_generation_tokens
        if step_tokens:  # idle heartbeats carry no step
            self.iteration_tokens.observe(step_tokens)
        self._log_prompt_tokens += stats.num_prompt_tokens
        self._log_generation_tokens += stats.num_generation_tokens

    def on_request_finished(self, timing: RequestTiming) -> None:
        if timing.submitted:
            self.queue_time.observe(max(0.0, timing.submitted - timing.arrival))
        if timing.first_token:
            self.ttft.observe(timing.first_token - timing.arrival)
        if timing.num_generation_tokens > 1 and timing.first_token:
            self.tpot.observe((timing.last_token - timing.first_token) / (timing.num_generation_tokens - 1))
        self.e2e.observe(timing.finished - timing.arrival)
        for gap in timing.inter_token_latencies:
            self.itl.observe(gap)
        if timing.first_token:
            if timing.submitted:
                self.prefill_time.observe(max(0.0, timing.first_token - timing.submitted))
            self.decode_time.observe(timing.last_token - timing.first_token)
        self.request_prompt_tokens.observe(timing.num_prompt_tokens)
        self.request_generation_tokens.observe(timing.num_generation_tokens)
        self._success.labels(model_name=self._model_name, finished_reason=timing.finish_reason or "stop").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ----- the periodic log -----
    def log_line(self) -> str | None:
        """One line of throughput since the last call; None when nothing happened (quiet when idle)."""
        now = time.monotonic()
        elapsed = max(now - self._log_time, 1e-6)
        prompt_tps = self._log_prompt_tokens / elapsed
        gen_tps = self._log_generation_tokens / elapsed
        idle = (not self._log_prompt_tokens and not self._log_generation_tokens
                and not self.last_stats.num_running_reqs and not self.last_stats.num_waiting_reqs)
        # The hit rate of this interval (as vLLM logs it), not since start-up: it shows what the
        # cache does for the current traffic.
        hit_rate = self._log_hits / self._log_queries if self._log_queries else 0.0
        self._log_prompt_tokens = self._log_generation_tokens = 0
        self._log_queries = self._log_hits = 0
        self._log_time = now
        if idle:
            return None
        s = self.last_stats
        return (f"Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation throughput: "
                f"{gen_tps:.1f} tokens/s, Running: {s.num_running_reqs} reqs, Waiting: "
                f"{s.num_waiting_reqs} reqs, KV cache usage: {100 * s.kv_cache_usage:.1f}%, "
                f"Prefix cache hit rate: {100 * hit_rate:.1f}%")


async def log_periodically(metrics: ServerMetrics, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        line = metrics.log_line()
        if line:
            logger.info("%s", line)
