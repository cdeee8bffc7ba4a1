"""labkit.course.continuous_batching (notebook 08): the side-by-side table and the findings follow
the measured rows on both sides of every verdict; the in-process engine trace and the rate sweep
run on the embedded model."""

from __future__ import annotations

import math

import pytest

from labkit.course import continuous_batching as lab
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.measure.loadstats import LoadTestResult, RequestRecord

WORKLOAD = lab.Workload(short_tokens=32, long_tokens=512, long_share=0.2, rate=4.0,
                        requests=10)


def test_workload_is_the_load_testers_mix():
    assert WORKLOAD.max_tokens == pytest.approx({32: 0.8, 512: 0.2})
    assert "--rate 4 --requests 10 --max-tokens 32:0.8,512:0.2 --seed 0" in WORKLOAD.cli
    assert "80% ask for 32 tokens, 20% for 512" in WORKLOAD.describe()
    assert lab.server_options("batched", 16, 50) == ["--max-batch-size", "16",
                                                     "--max-wait-ms", "50"]
    assert lab.server_options("continuous") == []
    assert lab.server_options("continuous", kv_cache_gb=2) == ["--kv-cache-gb", "2"]
    with pytest.raises(ValueError, match="mode"):
        lab.server_options("sequential")


def fake_run(mode: str, short_ms: float, long_ms: float, *, later: float = 1.0,
             cpu: bool = False, kv: bool = True) -> lab.Run:
    """A Run as `lab.run` returns it, from hand-made records: 8 short requests whose latency
    grows by `later` from the first to the last, and 2 long ones."""
    records = []
    for i in range(10):
        long = i in (3, 7)
        latency = long_ms if long else short_ms * (1 + (later - 1) * (i / 9))
        records.append(RequestRecord(
            index=i, url="http://x/generate", scheduled_s=i * 0.25, sent_s=i * 0.25,
            done_s=i * 0.25 + latency / 1000, latency_ms=latency, status=200, ok=True,
            max_tokens=512 if long else 32, tokens_generated=512 if long else 32,
            prompt_tokens=12, queue_time_ms=latency / 2, inference_time_ms=latency / 2,
            server_ttft_ms=10.0))
    config = {"rate": 4.0, "max_tokens": WORKLOAD.max_tokens, "seed": 0}
    server = {"uptime_s": 10.0, "busy_seconds": 2.0, "mode": mode}
    after = {**server, "uptime_s": 20.0, "busy_seconds": 8.0}
    utilization = {"mean_util": 40.0 if cpu else 90.0, "source": "cpu-mode" if cpu else "nvml",
                   "sm_activity_mean": None if cpu else 30.0, "queue_depth_max": 40.0,
                   "in_flight_max": 32.0}
    if kv:
        server |= {"preemptions": 0}
        after |= {"kv_pages_total": 8178, "kv_page_tokens": 16, "preemptions": 2}
        utilization |= {"kv_pages_used_max": 110.0, "queue_depth_max": 1.0,
                        "in_flight_max": 6.0}
    return lab.Run(mode, "m", "CPU" if cpu else "H200", WORKLOAD,
                   LoadTestResult(records, config), None, utilization, server, after)


def test_rows_split_latency_by_length_and_read_the_servers_counters():
    row = lab.row(fake_run("continuous", 200.0, 2500.0))
    assert row["short_p95_ms"] == pytest.approx(200.0)
    assert row["long_p50_ms"] == pytest.approx(2500.0)
    assert row["short_queue_ms"] == pytest.approx(100.0)
    assert row["server_busy_pct"] == pytest.approx(60.0)
    assert (row["kv_pages_used_max"], row["kv_pages_total"], row["preemptions"]) == (110, 8178, 2)
    assert row["prompt_tokens"] == 12 and row["short_trend"] == pytest.approx(1.0)
    batched = lab.row(fake_run("batched", 9000.0, 18000.0, later=3.0, kv=False))
    assert batched["preemptions"] is None and batched["kv_pages_used_max"] is None
    assert batched["short_trend"] == pytest.approx(3.0, rel=0.25)
    text = lab.table([batched, row])
    assert "short (32 tok) p95 ms" in text and "long (512 tok) p50 ms" in text
    assert "110/8178" in text and "GPU util % (NVML)" in text and "SM activity" in text
    cpu = lab.table([lab.row(fake_run("batched", 900.0, 1800.0, cpu=True, kv=False))])
    assert "busy % (CPU mode)" in cpu and "SM activity" not in cpu


def test_findings_follow_the_numbers_on_both_sides():
    batched = lab.row(fake_run("batched", 9000.0, 18000.0, later=3.0, kv=False))
    continuous = lab.row(fake_run("continuous", 200.0, 2500.0))
    assert batched["short_p95_ms"] == pytest.approx(26300.0, rel=0.01)
    text = lab.findings(batched, continuous)
    assert "26,300 ms batched vs 200 ms continuous, 0.01x (target ≤ 0.5x: met)." in text
    assert "did not halve" not in text
    assert "2,500 ms continuous (0.14x, under 1x is faster): they gained too." in text
    assert "did not make them faster" not in text
    assert "batched 0.34 req/s" in text
    assert "its last short requests took 2.6x as long as its first (over 2x): it fell behind" \
        in text
    assert "its queue grew (the arrivals outpaced what it served; that happens on any device, a " \
        "CPU only at a lower rate)" in text
    assert "took 1.0x as long as its first (under 2x): it kept up" in text
    faster = lab.findings(batched, {**continuous, "short_trend": 1 / 3})
    assert "its last short requests were 3.0x faster than its first (under 2x): it kept up" \
        in faster
    assert "at most 110 of 8178 pages in use (1.3%)" in text
    assert "a long request needs up to 33 pages of 16 tokens" in text  # ceil((12 + 512) / 16)
    assert "room for 247 of them" in text
    assert "2 preemptions: the running requests outgrew it" in text
    assert "SM activity 30.0 % vs 30.0 %" in text
    slow = lab.row(fake_run("continuous", 15000.0, 30000.0))
    worse = lab.findings(batched, slow)
    assert "0.57x (target ≤ 0.5x: NOT met). Continuous batching did not halve the short " \
        "requests' p95 here" in worse
    assert "seldom made them wait behind a long batch" in worse
    assert "as they do on a CPU, where each running request adds its own compute" in worse
    assert "(1.67x, under 1x is faster): continuous batching did not make them faster here. A " \
        "long request shares every step" in worse
    assert "much more on a CPU, where each row adds its own compute" in worse
    assert "they gained too" not in worse and ": met)" not in worse
    cpu = lab.findings(lab.row(fake_run("batched", 900.0, 1800.0, cpu=True, kv=False)),
                       lab.row(fake_run("continuous", 100.0, 1700.0, cpu=True)))
    assert "Server busy share (CPU mode, not GPU utilization): 40.0 % batched" in cpu
    assert "no SM activity to read" in cpu
    assert "SM activity 4" not in cpu and "NVML" not in cpu and "CPU mode" not in text


@pytest.mark.parametrize(("preempted", "ending"), [
    (0, "; no preemption: the running requests never needed more pages than it had."),
    (1, "; 1 preemption: the running requests outgrew it, and each preempted one gave its pages "
        "back to be prefilled again later."),
    (None, "room for 247 of them at once."),
])
def test_findings_preemption_or_not(preempted, ending):
    batched = lab.row(fake_run("batched", 9000.0, 18000.0, kv=False))
    continuous = {**lab.row(fake_run("continuous", 200.0, 2500.0)), "preemptions": preempted}
    kv = next(line for line in lab.findings(batched, continuous).splitlines() if "KV" in line)
    assert kv.endswith(ending)


def test_findings_leave_out_what_was_not_measured():
    """No trend (under 3 short requests), no /stats peaks, no paged cache, no GPM: no verdict
    on them, rather than one from missing numbers."""
    batched = {**lab.row(fake_run("batched", 9000.0, 18000.0, kv=False)),
               "short_trend": math.nan, "peak_waiting": None, "sm_activity_mean": None}
    continuous = {**lab.row(fake_run("continuous", 200.0, 2500.0)), "short_trend": math.nan,
                  "kv_pages_used_max": None}
    text = lab.findings(batched, continuous)
    assert "kept up" not in text and "fell behind" not in text
    assert "output tok/s; continuous 2.35 req/s and 301 output tok/s.\n" in text
    assert "/stats showed" not in text and "KV cache" not in text
    assert "Mean NVML utilization 90.0 % batched vs 90.0 % continuous." in text
    assert "SM activity" not in text and "CPU mode" not in text


def trace_row(step, running, waiting, used, finished, preemptions=0, total=39):
    return {"step": step, "ms": 10.0 * step, "running": running, "waiting": waiting,
            "kv_pages_used": used, "kv_pages_total": total, "decoded": running,
            "finished": finished, "preemptions": preemptions}


def test_trace_findings_waited_or_not_and_preempted_or_not():
    """Hand-made traces, both sides of each verdict (the engine fixture's runs below check the
    real ones)."""
    queued = [trace_row(1, 3, 2, 6, 0), trace_row(2, 3, 1, 6, 1), trace_row(3, 2, 0, 4, 3),
              trace_row(4, 0, 0, 0, 5, preemptions=1)]
    text = lab.trace_findings(queued, [object()] * 5, 3)
    assert "after step 1, 3 ran (max_running 3) and 2 waited" in text
    assert "The first request finished at step 2 and the first waiting one joined at step 2; " \
        "the last finished at step 4" in text
    assert "KV pages in use peaked at 6 of 39 and were back to 0" in text
    assert "1 preemption: running requests outgrew the cache" in text
    assert "all 5 requests still finished" in text
    assert "Nothing waited" not in text and "No preemption" not in text
    at_once = [trace_row(1, 2, 0, 4, 0), trace_row(2, 0, 0, 0, 2)]
    text = lab.trace_findings(at_once, [object()] * 2, 4)
    assert "Nothing waited: max_running and the KV cache held every request at once." in text
    assert "No preemption: the running requests never needed more pages" in text
    assert "joined" not in text and "preemptions:" not in text
    twice = lab.trace_findings([*queued[:-1], trace_row(4, 0, 0, 0, 5, preemptions=2)],
                               [object()] * 5, 3)
    assert "2 preemptions: running requests outgrew the cache" in twice


def test_latency_trend_needs_three_requests():
    short = fake_run("continuous", 100.0, 1000.0, later=2.0).result
    assert lab.latency_trend(short, 32) == pytest.approx(2.0, rel=0.3)
    assert math.isnan(lab.latency_trend(short, 512))  # only 2 long requests


@pytest.fixture(scope="module")
def engine_for(lm):
    def make(pages: int, max_running: int) -> ContinuousEngine:
        cache = PagedKVCache(lm.config, pages, lm.dtype, lm.device)
        return ContinuousEngine(lm, Llama.from_hf(lm.model), cache, max_running=max_running)
    return make


def test_step_trace_shows_requests_joining_as_others_leave(engine_for):
    requests = lab.mixed_requests(8, 3, 20, 0.25)
    assert sorted(r.max_tokens for r in requests) == [3] * 6 + [20] * 2
    rows, results = lab.step_trace(engine_for(40, 3), requests)
    assert [r.tokens_generated for r in results] == [r.max_tokens for r in requests]
    assert rows[0]["running"] == 3 and rows[0]["waiting"] == 5
    assert rows[-1]["finished"] == 8 and rows[-1]["kv_pages_used"] == 0
    assert max(r["running"] for r in rows) <= 3
    text = lab.trace_findings(rows, results, 3)
    assert "after step 1, 3 ran (max_running 3) and 5 waited" in text
    assert "the first waiting one joined at step" in text
    assert "No preemption: the running requests never needed more pages" in text
    table = lab.trace_table(rows, lines=6)
    assert table.splitlines()[0].split()[:3] == ["step", "ms", "running"]
    assert len(table.splitlines()) <= 6 + 7
    assert "/39 " in table and "page 0, which belongs to no request" in table


def test_a_small_cache_preempts_and_every_request_still_finishes(engine_for):
    """Notebook 08's CPU demo: a cache of 9 pages (8 usable) is outgrown by its running
    requests, so preemption happens, as the prose says it does."""
    requests = lab.mixed_requests(10, 4, 64, 0.2)
    rows, results = lab.step_trace(engine_for(9, 4), requests)
    assert [r.tokens_generated for r in results] == [r.max_tokens for r in requests]
    assert rows[-1]["preemptions"] >= 1 and rows[-1]["kv_pages_used"] == 0
    text = lab.trace_findings(rows, results, 4)
    assert "preemption" in text and "all 10 requests still finished" in text


def test_ttft_at_rates_measures_each_rate(engine_for):
    rows = lab.ttft_at_rates(engine_for(200, 4), [50.0, 400.0], 6, {2: 0.5, 6: 0.5}, warmup=1)
    assert [r["rate"] for r in rows] == [50.0, 400.0]
    for r in rows:
        assert 0 < r["ttft_p50_ms"] <= r["ttft_p95_ms"] <= r["latency_p95_ms"]
        assert r["requests"] == 6 and r["requests_per_second"] > 0
    assert "TTFT p95 ms" in lab.rates_table(rows)
