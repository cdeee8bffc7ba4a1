"""Plots render headless to PNG, with units, titles and CPU-mode labels; the live timeline updates
one output in place and leaves the final figure there under nbclient."""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import numpy as np
import pytest
from fake_nvml import FakeClock, FakeNvml
from nbclient import NotebookClient

from labkit.measure.plots import (
    LiveTimeline,
    figure_png,
    merge_spans,
    plot_concurrency_sweep,
    plot_latency_distribution,
    plot_server_state,
    plot_timeline,
)
from labkit.measure.utilization import CPU_MODE_LABEL, NvmlReader, UtilizationSampler

PNG = b"\x89PNG\r\n\x1a\n"
TESTS = Path(__file__).parent


def texts(fig) -> str:
    """Every label, legend entry and title in the figure, for assertions."""
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts += [ax.get_xlabel(), ax.get_ylabel()]
        parts += [ax.get_title(loc=loc) for loc in ("left", "center", "right")]
        legend = ax.get_legend()
        if legend:
            parts += [t.get_text() for t in legend.get_texts()]
        parts += [t.get_text() for t in ax.texts]
    return "\n".join(parts)


def fake_frame(n: int = 30, **nvml_kwargs):
    script = [{"gpu_util": 90 if 10 <= i < 20 else 0, "sm_activity": 40 if 10 <= i < 20 else 0}
              for i in range(n)]
    clock = FakeClock()  # GPM needs 100 ms between samples
    reader = NvmlReader(FakeNvml(script, **nvml_kwargs), clock=clock)
    s = UtilizationSampler(reader=reader, clock=clock)
    for _ in range(n):
        clock.t += 0.1
        s.sample_once()
    return s


def test_timeline_renders_with_units_title_and_request_spans():
    s = fake_frame()
    times = s.frame()["time"]
    s.add_requests([(times[10], times[15]), (times[14], times[19])])
    s.mark("load test starts", start=times[10])
    fig = plot_timeline(s.frame(), s.marks, model="synthetic:llama-3.2-3b")
    assert figure_png(fig).startswith(PNG)
    text = texts(fig)
    assert "synthetic:llama-3.2-3b on Fake GPU 80GB" in text
    for expected in ("time since the first sample, s", "memory used, GB", "power, W", "%",
                     "GPU utilization", "SM activity (GPM)", "requests in flight",
                     "load test starts", "mean 30.0 %", "idle 67% of samples"):
        assert expected in text, expected
    # the two overlapping requests are shaded as one span
    assert len(fig.axes[0].patches) == 1
    assert "_child" not in text


def test_timeline_without_gpm_draws_no_gpm_lines():
    fig = plot_timeline(fake_frame(gpm=False).frame())
    assert "SM activity" not in texts(fig)
    assert figure_png(fig).startswith(PNG)


def test_timeline_from_a_plain_dict_frame_and_all_missing_values():
    s = UtilizationSampler(reader=NvmlReader(FakeNvml(unsupported={"nvmlDeviceGetUtilizationRates",
                                                          "nvmlDeviceGetMemoryInfo"})))
    for _ in range(3):
        s.sample_once()
    frame = {k: np.asarray(v) for k, v in s.frame().items()}  # no pandas attrs
    fig = plot_timeline(frame, title="custom title")
    assert "custom title" in texts(fig)
    assert figure_png(fig).startswith(PNG)


def test_cpu_mode_timeline_says_it_is_not_gpu_utilization():
    class Stats:
        source, device_name = "cpu-mode", "labkit server http://x (CPU)"
        columns = ("busy_pct", "queue_depth", "in_flight", "requests_served")

        def __init__(self):
            self.i = 0

        def read(self):
            self.i += 1
            return {"busy_pct": 100.0 if self.i % 2 else 0.0, "queue_depth": 1.0,
                    "in_flight": 1.0, "requests_served": float(self.i)}

        def close(self):
            pass

    s = UtilizationSampler(reader=Stats())
    for _ in range(6):
        s.sample_once()
    text = texts(plot_timeline(s.frame(), model="model"))
    assert CPU_MODE_LABEL in text
    assert "not GPU utilization" in text and "GPU utilization (any kernel" not in text
    assert "queue depth, requests" in text


def test_merge_spans():
    assert merge_spans([(5, 6), (1, 3), (2, 4), (4, 4.5)]) == [(1, 4.5), (5, 6)]


def test_latency_distribution_marks_percentiles():
    latencies = np.linspace(100, 1100, 101)
    fig = plot_latency_distribution(latencies, model="model", device="CPU")
    text = texts(fig)
    assert "p50 = 600 ms" in text and "p95 = 1,050 ms" in text and "p99 = 1,090 ms" in text
    assert "latency (send → full response), ms" in text
    assert "model on CPU" in text
    two = plot_latency_distribution({"sequential": latencies, "batched": latencies / 2})
    assert "batched p50 = 300 ms" in texts(two)
    assert figure_png(plot_latency_distribution([])).startswith(PNG)


def test_concurrency_sweep_with_several_series():
    rows = [
        {"series": mode, "concurrency": c, "requests_per_second": rps * c ** k, "p50_ms": 800 * c,
         "p95_ms": 900 * c}
        for mode, rps, k in (("sequential", 1.2, 0), ("batched", 1.2, 0.9)) for c in (1, 5, 10)
    ]
    fig = plot_concurrency_sweep(rows, model="model", device="NVIDIA H100 80GB HBM3")
    text = texts(fig)
    for expected in ("throughput, requests/s", "latency, ms", "concurrency (requests in flight)",
                     "sequential: p50", "batched: p95", "model on NVIDIA H100 80GB HBM3"):
        assert expected in text, expected
    assert len(fig.axes[0].lines) == 2 and len(fig.axes[1].lines) == 4
    assert figure_png(fig).startswith(PNG)
    with pytest.raises(KeyError, match="requests_per_second"):
        plot_concurrency_sweep([{"concurrency": 1, "p50_ms": 3}])


def test_live_timeline_outside_ipython_keeps_the_final_figure(tmp_path):
    sampler = UtilizationSampler(interval=0.02, reader=NvmlReader(FakeNvml()))
    out = tmp_path / "live.png"
    with LiveTimeline(sampler, refresh=0.1, save_to=str(out)) as live:
        assert sampler.running
        assert live.watch(lambda x: (time.sleep(0.45), x)[1], 7) == 7
    assert not sampler.running  # it started the sampler, so it stopped it
    assert live.updates >= 2  # at least one redraw while watching, and the final one
    assert live.figure is not None and out.read_bytes().startswith(PNG)
    with pytest.raises(ZeroDivisionError), LiveTimeline(sampler, refresh=0.1) as live:
        live.watch(lambda: 1 / 0)


def test_watching_a_load_test_shades_its_requests():
    from labkit.measure.loadstats import LoadTestResult, RequestRecord

    def fake_load_test():
        time.sleep(0.3)
        return LoadTestResult([RequestRecord(index=0, url="u", scheduled_s=0.0, sent_s=0.0,
                                             done_s=0.2, latency_ms=200.0, status=200, ok=True)],
                              {})

    sampler = UtilizationSampler(interval=0.02, reader=NvmlReader(FakeNvml()))
    with LiveTimeline(sampler, refresh=0.1) as live:
        result = live.watch(fake_load_test)
    (mark,) = sampler.marks
    assert mark.end - mark.start == pytest.approx(0.2)
    assert abs(mark.end - time.perf_counter()) < 1.0
    assert result.records and len(live.figure.axes[0].patches) == 1


def test_live_timeline_with_a_running_sampler_and_marks():
    sampler = UtilizationSampler(interval=0.02, reader=NvmlReader(FakeNvml())).start()
    with LiveTimeline(sampler, refresh=0.1,
                      requests=lambda: [(time.perf_counter() - 0.1, time.perf_counter())]) as live:
        time.sleep(0.35)  # the background thread redraws
    assert sampler.running  # not ours to stop
    sampler.stop()
    assert live.updates >= 2
    assert len(live.figure.axes[0].patches) == 1  # the live request span is shaded
    assert sampler.marks == []  # live spans are drawn, not added to the sampler


@pytest.mark.slow
def test_live_timeline_under_nbclient_leaves_one_png_output():
    cell = f"""
import sys, time
sys.path.insert(0, {str(TESTS)!r})
from fake_nvml import FakeClock, FakeNvml
from labkit.measure.utilization import NvmlReader, UtilizationSampler
from labkit.measure.plots import LiveTimeline, plot_timeline
s = UtilizationSampler(interval=0.05, reader=NvmlReader(FakeNvml()))
with LiveTimeline(s, refresh=0.4, model="model") as live:
    live.watch(time.sleep, 2.0)
print("updates", live.updates)
"""
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(cell),
        nbformat.v4.new_code_cell('plot_timeline(s.frame(), model="model")'),
    ])
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(TESTS.parent)}}).execute()
    outputs = nb.cells[0].outputs
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1, outputs  # updated in place, not appended
    assert images[0]["output_type"] == "display_data"
    updates = int(next(o for o in outputs if o.get("name") == "stdout")["text"].split()[-1])
    assert updates >= 2  # at least one live update, then the final one
    result = nb.cells[1].outputs
    assert result and "image/png" in result[0]["data"]  # a returned Figure displays as PNG


def server_frame(kv: bool, gpu: bool = False) -> dict:
    """A sampler frame with a server's /stats columns: a continuous server (kv) or batched."""
    n = 20
    t = np.arange(n) * 0.1
    frame = {"time": 100 + t, "elapsed_s": t, "queue_depth": np.where(t > 1, 0.0, 5.0),
             "in_flight": np.full(n, 8.0), "requests_served": np.arange(n, dtype=float)}
    if gpu:
        frame |= {"gpu_util": np.full(n, 90.0), "mem_used_gb": np.full(n, 20.0),
                  "mem_total_gb": np.full(n, 141.0)}
    else:
        frame["busy_pct"] = np.full(n, 90.0)
    frame["kv_pages_used"] = np.linspace(0, 300, n) if kv else np.full(n, np.nan)
    frame["kv_pages_total"] = np.full(n, 7000.0) if kv else np.full(n, np.nan)
    return frame


def test_timeline_shows_what_waits_runs_and_the_kv_cache():
    gpu = texts(plot_timeline(server_frame(kv=True, gpu=True), model="m"))
    assert "queue depth, requests" in gpu and "in flight, requests" in gpu
    assert "KV cache pages in use (of 7,000)" in gpu and "memory used, GB" in gpu
    cpu = plot_timeline(server_frame(kv=True))
    assert "KV cache pages in use (of 7,000)" in texts(cpu) and len(cpu.axes) == 3  # + twin
    batched = texts(plot_timeline(server_frame(kv=False, gpu=True)))
    assert "queue depth, requests" in batched and "KV cache" not in batched
    plain = plot_timeline({k: v for k, v in server_frame(kv=False, gpu=True).items()
                           if k not in ("queue_depth", "in_flight", "requests_served")})
    assert len(plain.axes) == 2  # NVML alone: no server panel


def test_server_state_side_by_side():
    fig = plot_server_state({"batched": server_frame(kv=False),
                             "continuous": server_frame(kv=True)}, model="m", device="CPU")
    text = texts(fig)
    assert "waiting in the\nserver, requests" in text and "batched" in text
    assert "continuous: peak 4.3 % of 7,000 pages" in text
    assert figure_png(fig).startswith(PNG)
    lone = texts(plot_server_state({"batched": server_frame(kv=False)}))
    assert "no paged KV cache reported" in lone
