"""The seed's experiments, for real: `labkit serve` with the default model on this machine's CPU,
driven by `labkit.measure.loadtest`. Sequential serving means throughput stays flat as concurrency
grows, latency grows with it, and the server's queue time accounts for the growth."""

from __future__ import annotations

from pathlib import Path

import pytest

from labkit.measure import loadtest
from labkit.serve.launcher import launch

PROMPT = "Suggest a skincare routine for dry skin"
pytestmark = pytest.mark.solo  # throughput at one concurrency against another: no neighbours

MAX_TOKENS = 32  # long enough that HTTP and event-loop overhead stay small next to generation
REQUESTS = 20  # per level, as in the seed's Experiment 3


@pytest.fixture(scope="module")
def model_server():
    with launch(model="model", max_tokens_limit=64) as srv:  # CPU threads: the server's default
        yield srv


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def test_concurrency_1_5_10_throughput_flat_latency_grows_queue_time_explains_it(model_server):
    # Levels run in the order 1, 5, 10, 10, 5, 1 and each level's two runs are averaged: a
    # machine whose speed drifts (other work on a shared CPU) then affects every level alike.
    # temperature 0: every request generates the same tokens, so only queueing differs.
    runs: dict[int, list[dict]] = {1: [], 5: [], 10: []}
    for concurrency in (1, 5, 10, 10, 5, 1):
        runs[concurrency].append(loadtest.run(
            model_server.url, concurrency=concurrency, requests=REQUESTS, max_tokens=MAX_TOKENS,
            prompt=PROMPT, temperature=0, warmup=1, progress=False).summary())
    levels = {c: {"rps": mean(r["requests_per_sec"] for r in rs),
                  "p50": mean(r["latency_ms"]["p50"] for r in rs),
                  "latency": mean(r["latency_ms"]["mean"] for r in rs),
                  "queue": mean(r["queue_time_ms"]["mean"] for r in rs)}
              for c, rs in runs.items()}
    for c, level in levels.items():
        print(f"\nconcurrency {c:>2}: {level['rps']:.2f} req/s, p50 {level['p50']:.0f} ms, "
              f"mean queue {level['queue']:.0f} ms, mean latency {level['latency']:.0f} ms")
    assert all(r["successful"] == REQUESTS for rs in runs.values() for r in rs)
    base = levels[1]
    for c, level in levels.items():
        # throughput flat: one generation at a time, whatever the concurrency
        assert level["rps"] == pytest.approx(base["rps"], rel=0.25), (c, levels)
        # p50 grows roughly with concurrency: c - 1 requests ahead of each in steady state
        assert 0.6 * c <= level["p50"] / base["p50"] <= 1.4 * c, (c, levels)
        # queue time explains the growth: it accounts for (nearly) all the added latency
        growth = level["latency"] - base["latency"]
        if c > 1:
            assert level["queue"] == pytest.approx(growth, rel=0.25), (c, levels)
    assert base["queue"] < 0.1 * base["latency"]  # alone, nobody waits


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def test_500_requests_at_concurrency_32_all_succeed_with_stable_server_memory(model_server):
    url, pid = model_server.url, model_server.pid
    loadtest.run(url, concurrency=32, requests=100, max_tokens=1, progress=False)  # warm-up
    before = rss_mb(pid)
    result = loadtest.run(url, concurrency=32, requests=500, max_tokens=1, progress=False)
    after = rss_mb(pid)
    s = result.summary()
    print(f"\n500 requests at concurrency 32: {s['requests_per_sec']:.1f} req/s, server RSS "
          f"{before:.1f} -> {after:.1f} MB")
    assert s["successful"] == 500 and s["success_rate"] == 1.0
    # one generation at a time: most of every request's latency is waiting in the queue
    assert s["queue_time_ms"]["mean"] > 0.8 * s["latency_ms"]["mean"]
    assert after - before < max(20.0, 0.05 * before), (before, after)
    stats = loadtest_stats(url)
    assert stats["queue_depth"] == 0 and stats["in_flight"] == 0
    assert stats["requests_failed"] == 0


def loadtest_stats(url: str) -> dict:
    import json
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with direct.open(url + "/stats", timeout=10) as response:
        return json.load(response)["server"]
