"""Exercise set 04 (queueing): percentiles and Little's law."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from labkit.course.answers.verdict import (
    CheckResult,
    _compare,
    _count,
    _finish,
    _finite_values,
    _positive,
)


def p95_latency(answer, latencies_ms: Iterable[float | None]) -> CheckResult:
    """95th percentile of measured latencies (numpy's linear interpolation). Failed requests,
    given as None or NaN, are left out, as ARCHITECTURE.md's metric definitions say."""
    from labkit.measure.loadstats import percentiles

    values = _finite_values("latencies_ms", latencies_ms)
    expected = percentiles(values, (95,))["p95"]
    mistakes = [(float(np.mean(values)), "That is the mean; p95 is the latency that 95 % of "
                                         "requests beat."),
                (float(np.median(values)), "That is the median (p50)."),
                (float(np.max(values)), "That is the maximum; p95 interpolates below it.")]
    for method in ("nearest", "lower", "higher", "inverted_cdf", "closest_observation"):
        mistakes.append((float(np.percentile(values, 95, method=method)),
                         f"That is the {method!r} percentile definition; the course uses "
                         "linear interpolation (numpy's default, np.percentile(x, 95))."))
    return _finish(_compare(
        "p95_latency", answer, expected, unit="ms", rel_tol=0.002, mistakes=mistakes,
        hint="np.percentile(latencies, 95) over the successful requests only."))




def littles_law_throughput(answer, single_request_latency_s: float,
                           concurrency: int) -> CheckResult:
    """Requests/s a one-at-a-time server reaches at `concurrency`: still 1 / service time."""
    service = _positive("single_request_latency_s", single_request_latency_s)
    n = _count("concurrency", concurrency)
    expected = 1 / service
    mistakes = [(expected * 60, "That is requests per minute; give requests per second."),
                (service, "That is seconds per request; throughput is its inverse.")]
    if n > 1:
        mistakes.append((n / service, f"That assumes the {n} requests run in parallel. This "
                         "server generates one request at a time: more clients only queue."))
    return _finish(_compare(
        "littles_law_throughput", answer, expected, unit="requests/s", rel_tol=0.02,
        mistakes=mistakes,
        hint="a sequential server finishes one request per service time, whatever the "
             "concurrency: throughput = 1 / latency of one request."))


def littles_law_latency(answer, single_request_latency_s: float, concurrency: int) -> CheckResult:
    """Latency each client sees with `concurrency` requests always in flight: W = N / λ = N × S."""
    service = _positive("single_request_latency_s", single_request_latency_s)
    n = _count("concurrency", concurrency)
    expected = n * service
    mistakes = [(expected * 1000, "That is milliseconds; give seconds."),
                ((n + 1) / 2 * service, "That is the mean for one burst of N requests arriving "
                                        "together; with N always in flight, W = N / throughput.")]
    if n > 1:
        mistakes.append((service, "Latency does not stay flat: each request waits behind the "
                                  "others in the queue."))
    return _finish(_compare(
        "littles_law_latency", answer, expected, unit="s", rel_tol=0.05, mistakes=mistakes,
        hint="Little's law: requests in flight = throughput × latency, so latency = N ÷ "
             "throughput, with throughput = 1 / service time."))
