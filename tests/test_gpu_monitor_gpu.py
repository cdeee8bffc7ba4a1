"""The sampler on a real GPU. On the GPU machine: `pytest -m gpu -s tests/test_gpu_monitor_gpu.py`.

One sampler runs at 10 Hz through the whole module; each test runs a workload for a few seconds
and checks the summary of its own window. What they show (ARCHITECTURE.md, Metric definitions):
- a large bf16 matmul loop keeps the GPU busy *and* the SMs working;
- a one-thread spin kernel (`torch.cuda._sleep`) is 100 % "utilization" with idle SMs;
- the sampler itself costs < 2 % of one CPU core.

Each test prints one line; with LABKIT_RESULTS_DIR set, the module also saves its timeline
(PNG) and the measurements (JSON) there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from labkit.measure.utilization import UtilizationSampler

pytestmark = pytest.mark.gpu

PHASE_S = 4.0  # each workload runs this long
SETTLE_S = 1.0  # skipped at a phase's start: NVML utilization covers the last 1/6..1 s
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def torch():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    torch.cuda.init()
    return torch


@pytest.fixture(scope="module")
def sampler(torch):
    s = UtilizationSampler(interval=0.1)
    assert s.source == "nvml", "expected NVML on the GPU machine"
    s.start()
    yield s
    s.stop()
    out = os.environ.get("LABKIT_RESULTS_DIR")
    if out:
        from labkit.measure.plots import plot_timeline, save

        Path(out).mkdir(parents=True, exist_ok=True)
        save(plot_timeline(s.frame(), s.marks, title=f"labkit GPU tests on {s.device_name}: "
                           "idle, bf16 matmul, one-thread spin, idle"),
             str(Path(out) / "gpu_monitor_tests_timeline.png"))
        (Path(out) / "gpu_monitor_tests.json").write_text(json.dumps(
            {"device": s.device_name, "gpm": s.reader.gpm_status,
             "power": s.reader.power_kind, "phases": RESULTS}, indent=2))
    s.close()


def measure(sampler: UtilizationSampler, name: str, work=None, seconds: float = PHASE_S) -> dict:
    """Run work(deadline) (or sleep) for `seconds`; summarise the window after SETTLE_S."""
    start = time.perf_counter()
    sampler.mark(name, start, start + seconds)
    if work is None:
        time.sleep(seconds)
    else:
        work(start + seconds)
    end = time.perf_counter()
    summary = sampler.summary(start=start + SETTLE_S, end=end)
    RESULTS[name] = summary
    sm = summary.get("sm_activity_mean", float("nan"))
    tensor = summary.get("tensor_activity_mean", float("nan"))
    print(f"\n{name:<14} util mean {summary['mean_util']:5.1f} %"
          f"  idle {summary['idle_fraction']:4.0%}  SM activity {sm:5.1f} %"
          f"  tensor {tensor:5.1f} %  samples {summary['samples']}  [{sampler.device_name}]")
    return summary


def require_gpm(summary: dict, sampler: UtilizationSampler) -> float:
    if "sm_activity_mean" not in summary:
        pytest.fail(f"NVML GPM gave no SM activity on {sampler.device_name}: "
                    f"{sampler.reader.gpm_status}")
    return summary["sm_activity_mean"]


def test_idle_before(sampler):
    s = measure(sampler, "idle before")
    assert s["mean_util"] < 5, s


def test_bf16_matmul_loop_is_busy_gpu_and_busy_sms(sampler, torch):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()

    def work(deadline: float) -> None:
        while time.perf_counter() < deadline:
            for _ in range(20):  # ~2 ms each on an H100: keep the queue full, sync now and then
                a @ b
            torch.cuda.synchronize()

    s = measure(sampler, "bf16 matmul", work)
    assert s["mean_util"] > 80, s
    assert require_gpm(s, sampler) > 60, s


def test_one_thread_spin_is_busy_gpu_with_idle_sms(sampler, torch):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    torch.cuda.synchronize()
    cycles = int(10**8 * 50 / start.elapsed_time(end))  # ~50 ms per kernel

    def work(deadline: float) -> None:
        while time.perf_counter() < deadline:
            for _ in range(4):
                torch.cuda._sleep(cycles)
            torch.cuda.synchronize()

    s = measure(sampler, "spin (_sleep)", work)
    assert s["mean_util"] > 80, s
    assert require_gpm(s, sampler) < 5, s


def test_idle_after(sampler, torch):
    torch.cuda.synchronize()
    time.sleep(1.5)  # let the driver's utilization period roll past the last kernel
    s = measure(sampler, "idle after")
    assert s["mean_util"] < 5, s


def test_sampler_costs_under_2_percent_of_a_core(sampler):
    """process_time counts every thread of this process; the main thread sleeps, so nearly all
    of it is the sampler thread (NVML reads + GPM) at 10 Hz."""
    n0, cpu0, wall0 = len(sampler.samples), time.process_time(), time.perf_counter()
    time.sleep(5.0)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    rows = sampler.samples[n0:]
    share = cpu / wall
    with_gpm = sum(r.get("sm_activity") is not None for r in rows) / max(1, len(rows))
    RESULTS["sampler cost"] = {"cpu_share_of_core": share, "samples": len(rows),
                               "rate_hz": len(rows) / wall, "gpm_share": with_gpm}
    print(f"\nsampler cost   {share:.2%} of one core at {len(rows) / wall:.1f} Hz; "
          f"GPM values in {with_gpm:.0%} of samples")
    assert share < 0.02
    assert len(rows) / wall > 9  # the 10 Hz it promises
    assert with_gpm > 0.9  # GPM every sample (intervals >= 100 ms), not every other one
