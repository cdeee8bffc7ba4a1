"""Sampling logic against a scripted fake NVML; CPU mode against a scripted and a real server."""

from __future__ import annotations

import json
import math
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fake_nvml import FakeClock, FakeNvml, scripted_stats_server

import labkit.measure.gpu
from labkit.measure.readers import (
    CPU_MODE_LABEL,
    NoGpuError,
    NvmlReader,
    ServerStatsReader,
    open_reader,
    stats_url,
)
from labkit.measure.utilization import Mark, UtilizationSampler, loadtest_t0, request_spans

REPO = Path(__file__).resolve().parent.parent


def sampler_for(lib: FakeNvml, **kwargs) -> UtilizationSampler:
    return UtilizationSampler(reader=NvmlReader(lib), **kwargs)


def take(sampler: UtilizationSampler, n: int) -> None:
    for _ in range(n):
        sampler.sample_once()
        time.sleep(0.001)


# ------------------------------------------------------------------------------ NVML reader


def test_reads_every_metric_in_the_right_units():
    lib = FakeNvml([{"gpu_util": 42, "mem_util": 7, "mem_used": 6.5e9, "power_mw": 123_456}])
    clock = FakeClock()
    reader = NvmlReader(lib, clock=clock, sleep=clock.sleep)
    clock.t += 0.1
    row = reader.read()
    assert row == {
        "gpu_util": 42.0, "mem_util": 7.0, "mem_used_gb": 6.5, "mem_total_gb": 80.0,
        "power_w": pytest.approx(123.456), "sm_clock_mhz": 1980.0, "temp_c": 40.0,
        "sm_activity": 30.0, "sm_occupancy": 20.0, "tensor_activity": 5.0, "dram_bw": 12.0,
    }
    assert reader.device_name == "Fake GPU 80GB"
    assert reader.power_kind == "instant"
    assert reader.gpm_status == "available"


def test_summary_arithmetic():
    utils = [0, 2, 50, 100, 4, None]  # None: NVML error for that sample -> missing, not 0
    mems = [6e9, 7e9, 8e9, 7.5e9, 6.5e9, 7e9]
    sms = [1.0, 2.0, 60.0, None, 3.0, 4.0]
    lib = FakeNvml([{"gpu_util": u, "mem_used": m, "sm_activity": s}
                    for u, m, s in zip(utils, mems, sms, strict=True)])
    clock = FakeClock()
    s = UtilizationSampler(reader=NvmlReader(lib, clock=clock, sleep=clock.sleep), clock=clock)
    for _ in utils:
        clock.t += 0.1
        s.sample_once()
    summary = s.summary()
    assert summary["source"] == "nvml"
    assert summary["samples"] == 6
    assert summary["duration_s"] == pytest.approx(0.5)
    assert summary["mean_util"] == pytest.approx((0 + 2 + 50 + 100 + 4) / 5)
    assert summary["peak_util"] == 100
    assert summary["idle_fraction"] == pytest.approx(3 / 5)  # 0, 2, 4 are under 5 %
    assert summary["mem_used_min_gb"] == pytest.approx(6.0)
    assert summary["mem_used_max_gb"] == pytest.approx(8.0)
    assert summary["sm_activity_mean"] == pytest.approx((1 + 2 + 60 + 3 + 4) / 5)
    assert summary["tensor_activity_mean"] == pytest.approx(5.0)
    frame = s.frame()
    assert math.isnan(frame["gpu_util"].iloc[-1])  # recorded as missing
    assert math.isnan(frame["sm_activity"].iloc[3])


def test_summary_window_selects_samples_by_perf_counter_time():
    lib = FakeNvml([{"gpu_util": u} for u in (0, 0, 90, 90, 0)])
    clock = FakeClock(t=10.0)
    s = UtilizationSampler(reader=NvmlReader(lib, clock=clock, sleep=clock.sleep), clock=clock)
    for _ in range(5):
        clock.t += 1.0
        s.sample_once()  # times 11 .. 15
    window = s.summary(start=13.0, end=14.0)
    assert window["samples"] == 2 and window["mean_util"] == 90 and window["idle_fraction"] == 0
    assert s.summary()["idle_fraction"] == pytest.approx(3 / 5)


def test_error_in_one_metric_costs_only_that_value():
    lib = FakeNvml(errors={"nvmlDeviceGetClockInfo": {1}, "nvmlDeviceGetUtilizationRates": {2}})
    s = sampler_for(lib)
    take(s, 4)
    frame = s.frame()
    assert list(np.isnan(frame["sm_clock_mhz"])) == [False, True, False, False]
    assert list(np.isnan(frame["gpu_util"])) == [False, False, True, False]
    assert not np.isnan(frame["mem_used_gb"]).any()
    assert lib.calls["nvmlDeviceGetClockInfo"] == 4  # a transient error is retried next time


def test_unsupported_metric_is_detected_once_and_skipped():
    lib = FakeNvml(unsupported={"nvmlDeviceGetTemperature"})
    s = sampler_for(lib)
    take(s, 5)
    assert lib.calls["nvmlDeviceGetTemperature"] == 1
    assert np.isnan(s.frame()["temp_c"]).all()
    assert s.summary()["mean_util"] == 50


def test_power_falls_back_to_the_average_when_the_instant_field_is_missing():
    lib = FakeNvml(unsupported={"power_instant_field"})
    reader = NvmlReader(lib)
    rows = [reader.read() for _ in range(3)]
    assert [r["power_w"] for r in rows] == [250.0] * 3
    assert reader.power_kind == "average"
    assert lib.calls["nvmlDeviceGetFieldValues"] == 1


def test_gpu_without_gpm_has_no_gpm_columns_and_never_samples_gpm():
    lib = FakeNvml(gpm=False)
    s = sampler_for(lib)
    take(s, 3)
    assert "sm_activity" not in s.frame()
    assert not any(k.startswith(("sm_activity", "tensor", "dram", "sm_occ")) for k in s.summary())
    assert lib.calls["nvmlGpmSampleGet"] == 0
    assert "Hopper" in s.reader.gpm_status


def test_gpm_metric_the_driver_lacks_is_missing_not_zero():
    lib = FakeNvml(gpm_unsupported_metrics={"dram_bw"})
    clock = FakeClock()
    reader = NvmlReader(lib, clock=clock, sleep=clock.sleep)
    clock.t += 0.2
    row = reader.read()
    assert row["dram_bw"] is None and row["sm_activity"] == 30.0


def test_older_pynvml_without_a_gpm_constant_keeps_the_other_metrics():
    class OldNvml(FakeNvml):
        def __getattribute__(self, name):
            if name == "NVML_GPM_METRIC_DRAM_BW_UTIL":
                raise AttributeError(name)
            return super().__getattribute__(name)

    clock = FakeClock()
    reader = NvmlReader(OldNvml(), clock=clock, sleep=clock.sleep)
    assert "dram_bw" not in reader.columns and "sm_activity" in reader.columns
    clock.t += 0.1
    row = reader.read()
    assert "dram_bw" not in row and row["tensor_activity"] == 5.0


def test_gpm_samples_are_at_least_100_ms_apart():
    lib = FakeNvml([{"sm_activity": v} for v in (10, 20, 30)])
    clock = FakeClock()
    reader = NvmlReader(lib, clock=clock, sleep=clock.sleep)
    assert lib.calls["nvmlGpmSampleGet"] == 1  # the first interval starts at construction
    clock.t += 0.05  # too early: missing, and the interval keeps its start
    assert reader.read()["sm_activity"] is None
    assert lib.calls["nvmlGpmSampleGet"] == 1
    clock.t += 0.048  # 98 ms: a 2 ms wait is cheaper than losing the value
    assert reader.read()["sm_activity"] == 10
    assert clock.slept == [pytest.approx(0.002)]
    clock.t += 0.15
    assert reader.read()["sm_activity"] == 20
    reader.close()
    assert lib.freed == 2


def test_gpm_unavailable_at_start_is_reported_not_raised():
    lib = FakeNvml(unsupported={"nvmlGpmSampleGet"})
    reader = NvmlReader(lib)
    assert "sm_activity" not in reader.columns
    assert reader.gpm_status.startswith("unavailable")
    assert reader.read()["gpu_util"] == 50


# --------------------------------------------------------------------------------- the sampler


def test_background_thread_samples_at_the_interval():
    s = sampler_for(FakeNvml(), interval=0.02)
    with s:
        time.sleep(0.5)
    n = len(s.samples)
    assert 15 <= n <= 27, n
    times = np.asarray(s.frame()["time"])
    gaps = np.diff(times)
    assert (gaps > 0).all()
    assert np.median(gaps) == pytest.approx(0.02, abs=0.006)
    assert s.frame()["elapsed_s"].iloc[0] == 0.0
    assert abs(s.frame()["wall_time"].iloc[-1] - time.time()) < 1.0
    assert not s.running


def test_a_crashing_reader_is_reported_by_stop():
    class Broken:
        source, device_name, columns = "nvml", "broken", ("gpu_util",)

        def read(self):
            raise ZeroDivisionError("bug")

        def close(self):
            pass

    s = UtilizationSampler(reader=Broken(), interval=0.01).start()
    time.sleep(0.05)
    with pytest.raises(RuntimeError, match="sampler thread failed"):
        s.stop()


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval"):
        sampler_for(FakeNvml(), interval=0)


def test_marks_and_request_spans():
    s = sampler_for(FakeNvml())
    m = s.mark("warm-up done")
    assert m.end is None and m.start <= time.perf_counter()
    records = [
        {"send_time": 1.0, "latency_ms": 500.0},
        SimpleNamespace(send_time=2.0, finish_time=2.25),
        (3.0, 3.5),
        {"send_time": 4.0, "latency_ms": None, "error": "timeout"},  # no end: skipped
    ]
    assert request_spans(records) == [(1.0, 1.5), (2.0, 2.25), (3.0, 3.5)]
    assert s.add_requests(SimpleNamespace(records=records)) == 3
    assert s.marks[-1] == Mark(3.0, 3.5, "request")


def test_spans_from_a_labkit_load_test_result():
    from labkit.measure.loadstats import LoadTestResult, RequestRecord

    def rec(i, sent, done, ok=True):
        return RequestRecord(index=i, url="u", scheduled_s=sent, sent_s=sent, done_s=done,
                             latency_ms=(done - sent) * 1000, status=200 if ok else None, ok=ok)

    result = LoadTestResult([rec(0, 0.0, 1.0), rec(1, 0.001, 2.5), rec(2, 1.0, 3.0, ok=False)],
                            {})
    with pytest.raises(ValueError, match="t0"):
        request_spans(result)  # relative times and no t0: refuse to guess
    t0 = loadtest_t0(result, returned_at=103.0)  # run() returned just after the last completion
    assert t0 == pytest.approx(100.0)
    assert request_spans(result, t0) == [(100.0, 101.0), (100.001, 102.5), (101.0, 103.0)]
    result.t0 = 50.0  # a result that carries its own start wins over the estimate
    assert loadtest_t0(result, returned_at=103.0) == 50.0
    assert request_spans(result)[0] == (50.0, 51.0)


# ------------------------------------------------------------------------- choosing a reader


def test_no_nvml_and_no_url_says_how_to_use_cpu_mode(monkeypatch):
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    with pytest.raises(NoGpuError, match="--url"):
        UtilizationSampler()


def test_missing_device_index_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: FakeNvml())
    assert open_reader(0).device_name == "Fake GPU 80GB"
    with pytest.raises(NoGpuError, match="no GPU 1"):
        open_reader(1)


def test_stats_url_normalisation():
    assert stats_url("http://h:8000/generate") == "http://h:8000/stats"
    assert stats_url("http://h:8000/") == "http://h:8000/stats"
    assert stats_url("127.0.0.1:9000") == "http://127.0.0.1:9000/stats"
    # the URLs `labkit loadtest --api openai` takes (and its messages suggest) name the server
    for path in ("/v1", "/v1/", "/v1/completions", "/v1/chat/completions", "/v1/models"):
        assert stats_url("http://h:8000" + path) == "http://h:8000/stats", path
    assert stats_url("https://h/proxy/v1") == "https://h/proxy/stats"  # a prefix stays


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(ConnectionError, match="labkit serve"):
        ServerStatsReader("http://127.0.0.1:9", timeout=0.5)


# ---------------------------------------------------------------- CPU mode: scripted /stats


@pytest.fixture
def scripted_stats():
    with scripted_stats_server() as server:
        yield server


def test_cpu_mode_busy_percent_from_busy_seconds_deltas(scripted_stats):
    url, script = scripted_stats
    block = {"queue_depth": 0, "in_flight": 0, "requests_served": 0}
    script += [
        {**block, "uptime_s": 10.0, "busy_seconds": 2.0},  # read at construction
        {**block, "uptime_s": 11.0, "busy_seconds": 2.0},  # idle second
        {**block, "uptime_s": 12.0, "busy_seconds": 2.75, "in_flight": 1, "queue_depth": 2},
        {**block, "uptime_s": 12.5, "busy_seconds": 3.25},  # fully busy
    ]
    s = UtilizationSampler(reader=ServerStatsReader(url + "/generate"))
    take(s, 4)
    frame = s.frame()
    assert list(frame["busy_pct"].iloc[:3]) == [0.0, 75.0, 100.0]
    assert np.isnan(frame["busy_pct"].iloc[3])  # server answered without counters: missing
    assert frame["queue_depth"].iloc[1] == 2
    summary = s.summary()
    assert summary["source"] == "cpu-mode" and summary["metric"] == CPU_MODE_LABEL
    assert summary["mean_util"] == pytest.approx(175 / 3)
    assert summary["idle_fraction"] == pytest.approx(1 / 3)
    assert summary["mem_used_min_gb"] is None
    assert s.util_label == CPU_MODE_LABEL and "CPU" in s.device_name


def test_sampler_uses_cpu_mode_only_without_nvml(monkeypatch, scripted_stats):
    url, script = scripted_stats
    script.append({"uptime_s": 1.0, "busy_seconds": 0.0})
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: None)
    assert UtilizationSampler(url=url).source == "cpu-mode"
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: FakeNvml())
    assert UtilizationSampler(url=url).source == "nvml"


# ------------------------------------------------------------ CPU mode: a real `labkit serve`


@pytest.mark.slow
def test_cpu_mode_against_a_real_server():
    from labkit.serve.launcher import launch

    if not (REPO / "model" / "config.json").exists():
        pytest.skip("the default model (model/) is not built yet")
    body = json.dumps({"prompt": "Suggest a skincare routine", "max_tokens": 40}).encode()
    with launch(model="model", port=None) as srv:
        s = UtilizationSampler(interval=0.2, reader=ServerStatsReader(srv.url))
        with s:
            time.sleep(1.5)
            idle_end = busy_start = time.perf_counter()
            while time.perf_counter() - busy_start < 3.0:  # back-to-back requests for ~3 s
                req = urllib.request.Request(srv.url + "/generate", body,
                                             {"Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=60).read()
            busy_end = time.perf_counter()
    idle = s.summary(end=idle_end)
    busy = s.summary(start=busy_start + 0.5, end=busy_end)  # each value covers the last 0.2 s
    assert idle["source"] == busy["source"] == "cpu-mode"
    assert idle["samples"] >= 5 and idle["mean_util"] < 5, idle
    assert busy["samples"] >= 10 and busy["mean_util"] > 50, busy
    assert busy["metric"] == CPU_MODE_LABEL


# ------------------------------------------------------- the server's own columns (KV cache)


def test_cpu_mode_records_a_continuous_servers_kv_pages(scripted_stats):
    url, script = scripted_stats
    block = {"uptime_s": 1.0, "busy_seconds": 0.0, "queue_depth": 0, "in_flight": 0,
             "requests_served": 0}
    script += [block,
               {**block, "uptime_s": 2.0, "in_flight": 3, "kv_pages_used": 12,
                "kv_pages_total": 100},
               {**block, "uptime_s": 3.0, "queue_depth": 2, "in_flight": 5, "kv_pages_used": 40,
                "kv_pages_total": 100},
               {**block, "uptime_s": 4.0}]  # a batched server: no KV pages to report
    s = UtilizationSampler(reader=ServerStatsReader(url))
    take(s, 3)
    frame = s.frame()
    assert list(frame["kv_pages_used"].iloc[:2]) == [12, 40]
    assert np.isnan(frame["kv_pages_used"].iloc[2])  # missing, not zero
    summary = s.summary()
    assert summary["kv_pages_used_max"] == 40 and summary["kv_pages_total"] == 100
    assert summary["kv_used_peak_fraction"] == pytest.approx(0.4)
    assert summary["queue_depth_max"] == 2 and summary["in_flight_max"] == 5


def test_server_stats_beside_nvml(monkeypatch, scripted_stats):
    url, script = scripted_stats
    block = {"uptime_s": 1.0, "busy_seconds": 0.0, "queue_depth": 4, "in_flight": 32,
             "requests_served": 7, "kv_pages_used": 90, "kv_pages_total": 7000}
    script += [block, block]
    monkeypatch.setattr(labkit.measure.gpu, "nvml", lambda: FakeNvml([{"gpu_util": 97}]))
    s = UtilizationSampler(url=url, server_stats=True)
    assert s.source == "nvml" and s.util_column == "gpu_util"
    assert s.reader.gpm_status == "available"  # the NVML reader's own attributes still answer
    row = s.sample_once()
    assert row["gpu_util"] == 97.0 and row["queue_depth"] == 4 and row["kv_pages_used"] == 90
    assert "busy_pct" not in s.reader.columns  # the GPU's utilization is the one shown
    assert "kv_pages_total" in s.frame()
    plain = UtilizationSampler(url=url)  # without server_stats: NVML alone, as before
    assert "queue_depth" not in plain.reader.columns
    with pytest.raises(ValueError, match="url"):
        UtilizationSampler(server_stats=True)
