"""GET /metrics: the server's state in Prometheus text format (prometheus-client).

Two kinds of series:

- read at scrape time from the scheduler's own counters (nothing is counted twice): requests
  waiting and running, batch slots in use, requests by outcome, busy seconds, and, where NVML
  is available, the GPU's utilization and SM activity;
- histograms observed as each request is answered: time to first token, time per output token
  (inter-token latency), end-to-end latency and queue time, all measured in the server.

The prefix cache's counters are exported as vLLM's `vllm:prefix_cache_queries_total` and
`vllm:prefix_cache_hits_total` (prompt tokens looked up, and found cached) beside labkit's.
The gauges an autoscaler reads are also exported under vLLM's names (`vllm:num_requests_waiting`,
`vllm:num_requests_running`, `vllm:gpu_cache_usage_perc`), so KEDA, KServe or a Prometheus
Adapter rule written for vLLM read labkit unchanged. labkit's sequential and batched modes keep
no paged KV cache: their cache usage is the share of batch slots in use (running requests ÷ the
most a batch holds), 0 to 1 like vLLM's.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString

from labkit.engine.request import Result

# The text format every Prometheus-compatible scraper reads (colons in names included).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Seconds. A 150-token request takes from ~1 s (batched, GPU) to tens of seconds (queued).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


# The histograms observed as requests are answered: attribute, name, help, buckets.
HISTOGRAMS = (
    ("ttft", "labkit_time_to_first_token_seconds",
     "Request received -> its first token, in the server", LATENCY_BUCKETS),
    ("tpot", "labkit_time_per_output_token_seconds",
     "Inter-token latency: (generation - first token) / (tokens - 1)", TOKEN_BUCKETS),
    ("e2e", "labkit_e2e_request_latency_seconds",
     "Request received -> response ready, in the server", LATENCY_BUCKETS),
    ("queue", "labkit_request_queue_time_seconds",
     "Request queued -> its generation (or its batch) started", LATENCY_BUCKETS),
)


class ServerMetrics:
    """The /metrics registry of one server. `stats()` returns the scheduler's counters (plus
    `requests_rejected`); `gpu_reading()` returns NVML's columns or None without a GPU;
    `others()` the other API servers' `report()`s (`labkit.serve.api_servers`), whose
    histograms and token counts are added to this one's."""

    def __init__(self, stats: Callable[[], dict],
                 gpu_reading: Callable[[], dict | None] = lambda: None,
                 others: Callable[[], list[dict]] = lambda: []):
        self.registry = CollectorRegistry()
        self._stats, self._gpu_reading, self._others = stats, gpu_reading, others
        self.prompt_tokens = 0
        self.generation_tokens = 0
        # Observed here, exported summed with the other API servers' (so not registered).
        for attribute, name, text, buckets in HISTOGRAMS:
            setattr(self, attribute, Histogram(name, text, buckets=buckets, registry=None))
        self.registry.register(_StateCollector(self))

    def observe(self, result: Result, total_ms: float, ttft_ms: float | None = None) -> None:
        """Record one answered request; `total_ms` is its time in the server, `ttft_ms` when
        its first token went out (a stream's), else derived from the result's own times."""
        if ttft_ms is None:
            ttft_ms = total_ms - (result.inference_time_ms - result.time_to_first_token_ms)
        self.ttft.observe(max(0.0, ttft_ms) / 1000)
        self.e2e.observe(total_ms / 1000)
        self.queue.observe((result.queue_time_ms or 0.0) / 1000)
        if result.time_per_output_token_ms is not None:
            self.tpot.observe(result.time_per_output_token_ms / 1000)
        self.prompt_tokens += result.prompt_tokens
        self.generation_tokens += result.tokens_generated

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def report(self) -> dict:
        """This server's token counts and histograms, for the other API servers."""
        return {"prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
                "histograms": {attribute: _cumulative(getattr(self, attribute))
                               for attribute, *_ in HISTOGRAMS}}

    def histograms(self, others: list[dict]):
        """Each histogram, this server's buckets plus the other servers'."""
        for attribute, name, text, bounds in HISTOGRAMS:
            values = _cumulative(getattr(self, attribute))
            for other in others:
                values = [a + b for a, b in zip(values, other["histograms"][attribute],
                                                strict=True)]
            *counts, total = values
            edges = [floatToGoString(bound) for bound in bounds] + ["+Inf"]
            yield HistogramMetricFamily(name, text, buckets=list(zip(edges, counts, strict=True)),
                                        sum_value=total)


def _cumulative(histogram: Histogram) -> list[float]:
    """A histogram's cumulative bucket counts (+Inf last), then its sum."""
    samples = histogram.collect()[0].samples
    return ([s.value for s in samples if s.name.endswith("_bucket")]
            + [next(s.value for s in samples if s.name.endswith("_sum"))])


class _StateCollector:
    """Series read from the scheduler (and NVML) at each scrape."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s = self.metrics._stats()
        waiting, running = s["queue_depth"], s["in_flight"]
        slots = running / s["max_batch_size"] if s.get("max_batch_size") else 0.0
        # Continuous mode has a paged KV cache: its pages in use are what vLLM reports.
        cache = s["kv_pages_used"] / s["kv_pages_total"] if s.get("kv_pages_total") else slots
        for name, value, text in [
            ("labkit_requests_waiting", waiting, "Requests queued, not yet generating"),
            ("labkit_requests_running", running, "Requests generating now"),
            ("labkit_batch_slots_usage_ratio", slots, "Running requests / most in one batch"),
            ("vllm:num_requests_waiting", waiting, "vLLM name: requests waiting"),
            ("vllm:num_requests_running", running, "vLLM name: requests running"),
            ("labkit_kv_cache_usage_ratio", cache,
             "KV cache pages in use / all (continuous mode; other modes: batch slots)"),
            ("vllm:gpu_cache_usage_perc", cache,
             "vLLM name: KV cache usage, 0-1 (labkit's batch slots outside continuous mode)"),
        ]:
            yield GaugeMetricFamily(name, text, value=value)
        outcomes = CounterMetricFamily("labkit_requests", "Requests by outcome",
                                       labels=["outcome"])
        for outcome in ("served", "failed", "cancelled", "rejected"):
            outcomes.add_metric([outcome], s.get(f"requests_{outcome}", 0))
        yield outcomes
        yield CounterMetricFamily("vllm:request_success", "vLLM name: requests served",
                                  value=s["requests_served"])
        others = self.metrics._others()
        yield from self.metrics.histograms(others)
        for name in ("prompt_tokens", "generation_tokens"):
            value = getattr(self.metrics, name) + sum(other[name] for other in others)
            yield CounterMetricFamily(f"labkit_{name}", f"{name.replace('_', ' ')}",
                                      value=value)
            yield CounterMetricFamily(f"vllm:{name}", f"vLLM name: {name.replace('_', ' ')}",
                                      value=value)
        yield CounterMetricFamily("labkit_busy_seconds", "Wall time a generation was running",
                                  value=s["busy_seconds"])
        yield CounterMetricFamily("labkit_preemptions", "Requests preempted to free KV cache "
                                  "pages (continuous mode)", value=s.get("preemptions", 0))
        yield from _prefix_cache(s)
        gpu = self.metrics._gpu_reading()
        for column, name in [("gpu_util", "labkit_gpu_utilization_percent"),
                             ("sm_activity", "labkit_gpu_sm_activity_percent")]:
            if gpu and gpu.get(column) is not None:
                yield GaugeMetricFamily(name, f"NVML {column}, percent", value=gpu[column])


def _prefix_cache(s: dict):
    """The prefix cache's counters in prompt tokens (looked up at admission, found cached),
    under vLLM's names too, and the pages it keeps; 0 outside continuous mode."""
    for name, text in [("queries", "Prompt tokens looked up in the prefix cache"),
                       ("hits", "Prompt tokens found in the prefix cache")]:
        value = s.get(f"prefix_cache_{name}", 0)
        yield CounterMetricFamily(f"labkit_prefix_cache_{name}", text, value=value)
        yield CounterMetricFamily(f"vllm:prefix_cache_{name}", f"vLLM name: {text.lower()}",
                                  value=value)
    yield GaugeMetricFamily("labkit_kv_cache_cached_pages", "KV cache pages the prefix cache "
                            "keeps, held by a request or evictable",
                            value=s.get("kv_pages_cached", 0))
