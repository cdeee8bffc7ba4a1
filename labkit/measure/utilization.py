"""A background sampler of GPU utilization: NVML ten times a second, or a labkit server's busy %.

What each column means (ARCHITECTURE.md, "Metric definitions"):

- ``gpu_util``: NVML ``utilization.gpu``, the percent of the driver's last sample period (1/6 s to
  1 s) in which *any* kernel ran. A one-thread kernel counts as 100 %.
- ``mem_util``: percent of that period in which device memory was read or written (dmon's "mem").
- ``sm_activity``, ``sm_occupancy``, ``tensor_activity``, ``dram_bw`` (NVML GPM, Hopper and newer):
  how much of the chip worked, computed between two GPM samples at least 100 ms apart.
- ``busy_pct`` (CPU mode only, from a server's ``/stats``): percent of wall time in which the
  server's inference worker was generating. It is *not* GPU utilization, and every label says so.
- ``queue_depth``, ``in_flight``, ``requests_served``, ``kv_pages_used``, ``kv_pages_total``
  (from a labkit server's ``/stats``: always in CPU mode, beside NVML with
  ``UtilizationSampler(url=..., server_stats=True)``): requests waiting in the server, requests
  generating (a batched server's running batch; a continuous server's running requests), and a
  continuous server's paged KV cache, pages in use and pages in all (missing for other modes).

A metric the GPU or driver lacks is recorded as missing (NaN), never as zero: an NVML error costs
one value, an unsupported metric is detected once and then skipped.

Times are ``time.perf_counter()`` values, the clock the load tester stamps requests with, so
request spans overlay the timeline without conversion; ``wall_offset`` turns them into epoch time.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from labkit.measure.readers import (
    CPU_MODE_LABEL,
    GPM_COLUMNS,
    SERVER_COLUMNS,
    MetricReader,
    NoGpuError,
    NvmlReader,
    ServerStatsReader,
    Value,
    WithServerStats,
    open_reader,
)

IDLE_THRESHOLD_PCT = 5.0  # a sample under this utilization counts as idle
GPU_UTIL_LABEL = "GPU utilization (NVML utilization.gpu)"

# column -> label with unit, for tables and plots
COLUMN_LABELS: dict[str, str] = {
    "gpu_util": "GPU utilization, %",
    "mem_util": "memory busy, %",
    "mem_used_gb": "memory used, GB",
    "mem_total_gb": "memory total, GB",
    "power_w": "power, W",
    "sm_clock_mhz": "SM clock, MHz",
    "temp_c": "temperature, °C",
    "sm_activity": "SM activity, %",
    "sm_occupancy": "SM occupancy, %",
    "tensor_activity": "tensor activity, %",
    "dram_bw": "DRAM bandwidth, %",
    "busy_pct": "worker busy, % (CPU mode)",
    "queue_depth": "queue depth, requests",
    "in_flight": "in flight, requests",
    "requests_served": "requests served",
    "kv_pages_used": "KV cache pages in use",
    "kv_pages_total": "KV cache pages in all",
}


# ---------------------------------------------------------------------------------- the sampler


@dataclass(frozen=True)
class Mark:
    """Something to overlay on a timeline: a span (start..end) or an instant (end None).
    Times are time.perf_counter() values."""

    start: float
    end: float | None = None
    label: str = ""


_START_KEYS = ("send_time", "sent_at", "t_send", "start", "start_time", "send")
_END_KEYS = ("finish_time", "finished_at", "t_finish", "end", "end_time", "finish")


def _field(record: Any, keys: Iterable[str]) -> float | None:
    for key in keys:
        value = record.get(key) if isinstance(record, dict) else getattr(record, key, None)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def loadtest_t0(result: Any, returned_at: float | None = None) -> float | None:
    """The perf_counter time a load test's relative record times (sent_s, done_s) count from:
    `result.t0`, or its config's `t0_perf_counter` (labkit's load test records it, also when it
    ran in another process: perf_counter is the system's monotonic clock); else, given the
    perf_counter time at which run() returned, that time minus the last completion (off by the
    client's close-down, a few ms, far below the 100 ms sampling interval)."""
    t0 = getattr(result, "t0", None)
    if not isinstance(t0, (int, float)):  # labkit's load test records its start in its config
        t0 = (getattr(result, "config", None) or {}).get("t0_perf_counter")
    if isinstance(t0, (int, float)):
        return float(t0)
    done = [_field(r, ("done_s",)) for r in getattr(result, "records", ())]
    done = [d for d in done if d is not None]
    if returned_at is None or not done:
        return None
    return returned_at - max(done)


def request_spans(requests: Any, t0: float | None = None) -> list[tuple[float, float]]:
    """(send, finish) perf_counter pairs from a load test result (its `.records`), a list of
    records, or (send, finish) pairs. Records may carry absolute times (send_time/finish_time,
    or send_time + latency_ms) or times relative to the test's start (sent_s or scheduled_s, done_s:
    labkit.measure.loadtest's), which need `t0` (see `loadtest_t0`) unless the result has `.t0`."""
    records = getattr(requests, "records", requests)
    if t0 is None:
        t0 = loadtest_t0(requests)
    spans = []
    for rec in records:
        if isinstance(rec, (tuple, list)) and len(rec) == 2:
            spans.append((float(rec[0]), float(rec[1])))
            continue
        done = _field(rec, ("done_s",))
        if done is not None:  # relative to the load test's start
            if t0 is None:
                raise ValueError("these request times are relative to the load test's start: "
                                 "pass t0=loadtest_t0(result, returned_at=<perf_counter when "
                                 "run() returned>)")
            start = _field(rec, ("sent_s", "scheduled_s", "due_s"))
            if start is not None:
                spans.append((t0 + start, t0 + done))
            continue
        start, end = _field(rec, _START_KEYS), _field(rec, _END_KEYS)
        if end is None and start is not None:
            latency_ms = _field(rec, ("latency_ms",))
            end = None if latency_ms is None else start + latency_ms / 1000
        if start is not None and end is not None:
            spans.append((start, end))
    return spans


class UtilizationSampler:
    """Samples a GPU (NVML) every `interval` seconds in a background thread.

    Without NVML it falls back to CPU mode when `url` names a labkit server; `reader` injects any
    source (tests use a fake NVML). With `server_stats` and a `url`, the server's /stats columns
    (SERVER_COLUMNS: queue, in flight, KV cache pages) are sampled beside NVML too (in CPU mode
    they always are). Use as a context manager, or start()/stop(); sample_once() takes one
    sample synchronously (`labkit monitor` does).
    """

    def __init__(
        self,
        interval: float = 0.1,
        device: int = 0,
        *,
        url: str | None = None,
        reader: MetricReader | None = None,
        clock: Callable[[], float] = time.perf_counter,
        server_stats: bool = False,
    ) -> None:
        if not interval > 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval!r}")
        if server_stats and not url:
            raise ValueError("server_stats needs the server's url")
        self.interval = float(interval)
        self.reader = reader if reader is not None else open_reader(device, url)
        if server_stats and self.reader.source != "cpu-mode":
            self.reader = WithServerStats(self.reader, ServerStatsReader(url))
        self._clock = clock
        self.wall_offset = time.time() - clock()  # epoch = perf_counter + wall_offset
        self.t0: float | None = None
        self.marks: list[Mark] = []
        self._rows: list[dict[str, Value]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- identity / labels
    @property
    def source(self) -> str:
        return self.reader.source

    @property
    def device_name(self) -> str:
        return self.reader.device_name

    @property
    def util_column(self) -> str:
        return "busy_pct" if self.source == "cpu-mode" else "gpu_util"

    @property
    def util_label(self) -> str:
        return CPU_MODE_LABEL if self.source == "cpu-mode" else GPU_UTIL_LABEL

    # -- sampling
    def sample_once(self) -> dict[str, Value]:
        t = self._clock()
        row = {"time": t, **self.reader.read()}
        with self._lock:
            if self.t0 is None:
                self.t0 = t
            self._rows.append(row)
        return row

    def _run(self) -> None:
        next_t = self._clock()
        try:
            while not self._stop.is_set():
                self.sample_once()
                next_t += self.interval
                now = self._clock()
                if next_t < now:  # fell behind (slow read): resume the grid, don't burst
                    next_t = now
                self._stop.wait(next_t - now)
        except BaseException as err:  # surfaced by stop(); a silent dead thread would lie
            self._error = err

    def start(self) -> UtilizationSampler:
        if self.running:
            return self
        self._stop.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="labkit-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> UtilizationSampler:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(5.0, 5 * self.interval))
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise RuntimeError(f"the sampler thread failed: {err!r}") from err
        return self

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        self.stop()
        self.reader.close()

    def __enter__(self) -> UtilizationSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- marks
    def mark(self, label: str = "", start: float | None = None, end: float | None = None) -> Mark:
        """Overlay a span (start..end) or an instant (end None; start defaults to now)."""
        m = Mark(self._clock() if start is None else start, end, label)
        self.marks.append(m)
        return m

    def add_requests(self, requests: Any, label: str = "request", t0: float | None = None) -> int:
        """Add each request of a load test (result, records or (send, finish) pairs) as a span;
        see `request_spans` for the record formats and `t0`."""
        spans = request_spans(requests, t0)
        self.marks.extend(Mark(s, e, label) for s, e in spans)
        return len(spans)

    # -- results
    @property
    def samples(self) -> list[dict[str, Value]]:
        with self._lock:
            return list(self._rows)

    def frame(self, start: float | None = None, end: float | None = None):
        """Samples as columns: a pandas DataFrame where pandas is installed, else a dict of
        numpy arrays. Columns: time (perf_counter s), elapsed_s (since the first sample),
        wall_time (epoch s), then the reader's metrics; missing values are NaN."""
        rows = [r for r in self.samples if _within(r["time"], start, end)]
        t = np.array([r["time"] for r in rows], dtype=float)
        cols: dict[str, np.ndarray] = {
            "time": t,
            "elapsed_s": t - (self.t0 if self.t0 is not None else 0.0),
            "wall_time": t + self.wall_offset,
        }
        for col in self.reader.columns:
            cols[col] = np.array([_nan(r.get(col)) for r in rows], dtype=float)
        attrs = {"source": self.source, "device": self.device_name, "t0": self.t0,
                 "util_column": self.util_column, "util_label": self.util_label}
        try:
            import pandas as pd
        except ImportError:
            return cols
        df = pd.DataFrame(cols)
        df.attrs.update(attrs)
        return df

    def summary(self, start: float | None = None, end: float | None = None) -> dict[str, Any]:
        """Mean/peak utilization, idle fraction (share of samples < 5 %), memory min/max, GPM
        means, over all samples or those with start <= time <= end (perf_counter)."""
        frame = self.frame(start, end)
        return summarize(frame, source=self.source, device=self.device_name)


def _within(t: float, start: float | None, end: float | None) -> bool:
    return (start is None or t >= start) and (end is None or t <= end)


def _nan(value: Value) -> float:
    return math.nan if value is None else float(value)


def _present(frame: Any, col: str) -> np.ndarray:
    if col not in frame:
        return np.array([], dtype=float)
    values = np.asarray(frame[col], dtype=float)
    return values[~np.isnan(values)]


def summarize(frame: Any, *, source: str, device: str = "") -> dict[str, Any]:
    """The summary of a frame (see UtilizationSampler.summary). Means skip missing samples; a
    metric with no value at all is None (utilization, memory) or left out (GPM means, power)."""
    util_col = "busy_pct" if source == "cpu-mode" else "gpu_util"
    util = _present(frame, util_col)
    times = np.asarray(frame["time"], dtype=float)
    mem = _present(frame, "mem_used_gb")
    out: dict[str, Any] = {
        "source": source,
        "device": device,
        "metric": CPU_MODE_LABEL if source == "cpu-mode" else GPU_UTIL_LABEL,
        "samples": int(len(times)),
        "duration_s": float(times[-1] - times[0]) if len(times) else 0.0,
        "mean_util": float(util.mean()) if len(util) else None,
        "peak_util": float(util.max()) if len(util) else None,
        "idle_fraction": float((util < IDLE_THRESHOLD_PCT).mean()) if len(util) else None,
        "mem_used_min_gb": float(mem.min()) if len(mem) else None,
        "mem_used_max_gb": float(mem.max()) if len(mem) else None,
    }
    for col in (*GPM_COLUMNS, "power_w"):
        values = _present(frame, col)
        if len(values):
            out[f"{col}_mean"] = float(values.mean())
    for col in ("queue_depth", "in_flight", "kv_pages_used"):  # the server's, where sampled
        values = _present(frame, col)
        if len(values):
            out[f"{col}_max"] = float(values.max())
    total = _present(frame, "kv_pages_total")
    if len(total) and "kv_pages_used_max" in out:
        out["kv_pages_total"] = float(total.max())
        out["kv_used_peak_fraction"] = out["kv_pages_used_max"] / out["kv_pages_total"]
    return out


# The readers live in labkit.measure.readers; callers take them from here with the sampler.
__all__ = ["COLUMN_LABELS", "CPU_MODE_LABEL", "GPM_COLUMNS", "IDLE_THRESHOLD_PCT", "SERVER_COLUMNS",
           "Mark", "MetricReader", "NoGpuError", "NvmlReader", "ServerStatsReader",
           "UtilizationSampler", "Value", "WithServerStats", "loadtest_t0", "open_reader",
           "request_spans", "summarize"]
