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

import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from labkit.measure import gpu
from labkit.measure.auth import api_key_from_env, auth_headers

IDLE_THRESHOLD_PCT = 5.0  # a sample under this utilization counts as idle
GPM_MIN_GAP_S = 0.1  # NVML: GPM samples should be >= 100 ms apart (internal refresh rate)
CPU_MODE_LABEL = "CPU mode: inference worker busy %, not GPU utilization"
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
# What a labkit server's /stats adds to the samples (ServerStatsReader, WithServerStats).
SERVER_COLUMNS = ("queue_depth", "in_flight", "requests_served", "kv_pages_used",
                  "kv_pages_total")
GPM_COLUMNS = ("sm_activity", "sm_occupancy", "tensor_activity", "dram_bw")
Value = float | None


class NoGpuError(RuntimeError):
    """No NVML/GPU here and no server URL to fall back on."""


class MetricReader(Protocol):
    """One source of samples. `read()` never raises for a metric: missing values are None."""

    source: str  # "nvml" or "cpu-mode"
    device_name: str
    columns: tuple[str, ...]

    def read(self) -> dict[str, Value]: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------- NVML

# nvmlValueType_t -> the c_nvmlValue_t union member that holds it
_VALUE_FIELDS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal",
                 6: "usVal"}
_GPM_METRICS = {  # our column -> pynvml constant name
    "sm_activity": "NVML_GPM_METRIC_SM_UTIL",
    "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",
    "tensor_activity": "NVML_GPM_METRIC_ANY_TENSOR_UTIL",
    "dram_bw": "NVML_GPM_METRIC_DRAM_BW_UTIL",
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads one GPU through NVML. `lib` is the initialised pynvml module (or a fake in tests)."""

    source = "nvml"

    def __init__(
        self,
        lib: Any,
        index: int = 0,
        *,
        gpm_min_gap_s: float = GPM_MIN_GAP_S,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._lib = lib
        self._handle = lib.nvmlDeviceGetHandleByIndex(index)
        self.device_name = _text(lib.nvmlDeviceGetName(self._handle))
        self._unsupported: set[str] = set()
        self._unsupported_codes = {
            getattr(lib, "NVML_ERROR_NOT_SUPPORTED", 3),
            getattr(lib, "NVML_ERROR_FUNCTION_NOT_FOUND", 13),
        }
        self._gpm = _Gpm(self, gpm_min_gap_s, clock, sleep)
        self.gpm_status = self._gpm.status
        self.power_kind = "instant"  # becomes "average" if the instantaneous field is missing
        cols = ["gpu_util", "mem_util", "mem_used_gb", "mem_total_gb", "power_w", "sm_clock_mhz",
                "temp_c"]
        self.columns = tuple(cols + (list(self._gpm.metrics) if self._gpm.enabled else []))

    def is_unsupported(self, err: BaseException) -> bool:
        """NOT_SUPPORTED / FUNCTION_NOT_FOUND, or a pynvml too old to have the call."""
        if isinstance(err, (AttributeError, NotImplementedError)):
            return True
        return getattr(err, "value", None) in self._unsupported_codes

    def _try(self, name: str, fn: Callable[[], Any]) -> Any:
        """fn() or None; an unsupported metric is remembered and never asked for again."""
        if name in self._unsupported:
            return None
        try:
            return fn()
        except Exception as err:  # any NVML error costs this one value, never the sample
            if self.is_unsupported(err):
                self._unsupported.add(name)
            return None

    def read(self) -> dict[str, Value]:
        lib, h = self._lib, self._handle
        row: dict[str, Value] = dict.fromkeys(self.columns)
        util = self._try("utilization", lambda: lib.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            row["gpu_util"], row["mem_util"] = float(util.gpu), float(util.memory)
        mem = self._try("memory", lambda: lib.nvmlDeviceGetMemoryInfo(h))
        if mem is not None:
            row["mem_used_gb"], row["mem_total_gb"] = mem.used / 1e9, mem.total / 1e9
        row["power_w"] = self._power_w()
        clock = self._try("clock", lambda: lib.nvmlDeviceGetClockInfo(h, lib.NVML_CLOCK_SM))
        row["sm_clock_mhz"] = None if clock is None else float(clock)
        temp = self._try("temperature",
                         lambda: lib.nvmlDeviceGetTemperature(h, lib.NVML_TEMPERATURE_GPU))
        row["temp_c"] = None if temp is None else float(temp)
        if self._gpm.enabled:
            row.update(self._gpm.read())
        return row

    def _power_w(self) -> Value:
        # The instantaneous field (newer drivers) follows load; nvmlDeviceGetPowerUsage is a
        # 1-second average on recent GPUs, so it is only the fallback.
        if "power_instant" not in self._unsupported:
            value = self._try("power_instant", self._instant_power_mw)
            if value is not None:
                return value / 1000
            if "power_instant" not in self._unsupported:
                return None  # a transient error: missing, not a value from another source
        self.power_kind = "average"
        value = self._try("power_average", lambda: self._lib.nvmlDeviceGetPowerUsage(self._handle))
        return None if value is None else value / 1000

    def _instant_power_mw(self) -> Value:
        lib = self._lib
        field = lib.nvmlDeviceGetFieldValues(self._handle, [lib.NVML_FI_DEV_POWER_INSTANT])[0]
        if field.nvmlReturn != 0:
            if field.nvmlReturn in self._unsupported_codes:
                self._unsupported.add("power_instant")
            return None
        return float(getattr(field.value, _VALUE_FIELDS.get(field.valueType, "uiVal")))

    def close(self) -> None:
        self._gpm.close()


class _Gpm:
    """NVML GPM metrics, each computed between the previous GPM sample and a new one."""

    def __init__(self, nvml: NvmlReader, min_gap_s: float, clock, sleep) -> None:
        self._nvml, self._lib, self._h = nvml, nvml._lib, nvml._handle
        self._min_gap, self._clock, self._sleep = min_gap_s, clock, sleep
        self._samples: list[Any] = []
        self._ids: dict[str, int] = {}
        self.enabled = False
        try:
            if not self._lib.nvmlGpmQueryDeviceSupport(self._h).isSupportedDevice:
                self.status = "not supported by this GPU (NVML GPM needs Hopper or newer)"
                return
            # an older pynvml may lack a metric's constant: skip that metric, keep the rest
            self._ids = {col: getattr(self._lib, const) for col, const in _GPM_METRICS.items()
                         if hasattr(self._lib, const)}
            if not self._ids:
                raise AttributeError("this pynvml has none of the GPM metric constants")
            self._samples = [self._lib.nvmlGpmSampleAlloc(), self._lib.nvmlGpmSampleAlloc()]
            self._lib.nvmlGpmSampleGet(self._h, self._samples[0])
        except Exception as err:
            self.status = f"unavailable: {type(err).__name__}: {err}"
            self.close()
            return
        self._prev_t = clock()
        self.enabled = True
        self.status = "available"

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(self._ids)

    def read(self) -> dict[str, Value]:
        missing: dict[str, Value] = dict.fromkeys(self._ids)
        shortfall = self._min_gap - (self._clock() - self._prev_t)
        if shortfall > 0:
            # Scheduling jitter at 10 Hz: wait out a few ms rather than lose every other value.
            if shortfall > 0.1 * self._min_gap:
                return missing
            self._sleep(shortfall)
        prev, cur = self._samples
        lib = self._lib
        try:
            lib.nvmlGpmSampleGet(self._h, cur)
        except Exception as err:
            if self._nvml.is_unsupported(err):
                self.enabled = False
                self.status = f"stopped: {err}"
            return missing
        now = self._clock()
        request = lib.c_nvmlGpmMetricsGet_t()
        request.version = lib.NVML_GPM_METRICS_GET_VERSION
        request.numMetrics = len(self._ids)
        request.sample1, request.sample2 = prev, cur
        for i, metric_id in enumerate(self._ids.values()):
            request.metrics[i].metricId = metric_id
        self._samples = [cur, prev]  # the new sample is the next interval's start
        self._prev_t = now
        try:
            lib.nvmlGpmMetricsGet(request)
        except Exception:
            return missing
        out = missing
        for i, col in enumerate(self._ids):
            metric = request.metrics[i]
            if metric.nvmlReturn == 0 and math.isfinite(metric.value):
                out[col] = float(metric.value)
        return out

    def close(self) -> None:
        for sample in self._samples:
            try:
                self._lib.nvmlGpmSampleFree(sample)
            except Exception:
                pass
        self._samples = []
        self.enabled = False


# ------------------------------------------------------------------------------ CPU mode (/stats)


def stats_url(url: str) -> str:
    """'http://host:8000', '.../generate' or '.../stats' -> 'http://host:8000/stats'."""
    base = url.rstrip("/")
    for suffix in ("/generate", "/stats", "/health"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    if not base.startswith(("http://", "https://")):
        base = "http://" + base
    return base + "/stats"


class ServerStatsReader:
    """CPU mode: polls a labkit server's GET /stats. busy_pct = Δbusy_seconds / Δuptime_s
    between two polls, both read from the same server at the same moment (no HTTP jitter);
    queue depth, requests in flight and served, and a continuous server's KV cache pages
    (SERVER_COLUMNS) as the server reports them."""

    source = "cpu-mode"
    columns = ("busy_pct", *SERVER_COLUMNS)

    def __init__(self, url: str, *, timeout: float = 2.0) -> None:
        self.url = stats_url(url)
        self._timeout = timeout
        try:
            stats = self._fetch()
        except (OSError, ValueError) as err:
            raise ConnectionError(
                f"could not read {self.url}: {err}. Is `labkit serve` running at that address?"
            ) from err
        self._prev = stats.get("server") or {}
        where = stats.get("gpu_name") or "CPU"
        self.device_name = f"labkit server {self.url[: -len('/stats')]} ({where})"

    def _fetch(self) -> dict:
        request = urllib.request.Request(self.url, headers=auth_headers(api_key_from_env()))
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            return json.load(response)

    def read(self) -> dict[str, Value]:
        row: dict[str, Value] = dict.fromkeys(self.columns)
        try:
            server = self._fetch().get("server") or {}
        except (OSError, ValueError):
            return row  # server busy/restarting: this sample is missing
        for key in SERVER_COLUMNS:
            if isinstance(server.get(key), (int, float)):
                row[key] = float(server[key])
        try:
            d_busy = server["busy_seconds"] - self._prev["busy_seconds"]
            d_up = server["uptime_s"] - self._prev["uptime_s"]
        except (KeyError, TypeError):
            d_busy = d_up = 0.0
        if d_up > 0:
            row["busy_pct"] = min(100.0, max(0.0, 100.0 * d_busy / d_up))
        self._prev = server
        return row

    def close(self) -> None:
        pass


class WithServerStats:
    """A reader (NVML) plus a labkit server's SERVER_COLUMNS from its /stats, in one sample:
    the GPU's view and the server's own (what waits, what runs, its KV cache) side by side.
    Everything else (source, device name, GPM status) is the first reader's."""

    def __init__(self, reader: MetricReader, server: ServerStatsReader) -> None:
        self.reader, self.server = reader, server
        self.columns = (*reader.columns,
                        *(c for c in SERVER_COLUMNS if c not in reader.columns))

    def __getattr__(self, name: str) -> Any:  # source, device_name, gpm_status, ...
        return getattr(self.reader, name)

    def read(self) -> dict[str, Value]:
        row = self.reader.read()
        server = self.server.read()
        row.update((c, server.get(c)) for c in self.columns if c not in row)
        return row

    def close(self) -> None:
        self.reader.close()
        self.server.close()


def open_reader(device: int = 0, url: str | None = None) -> MetricReader:
    """NVML for GPU `device` if there is one, else CPU mode on `url`, else NoGpuError."""
    lib = gpu.nvml()
    problem = "NVML is not available (no NVIDIA driver or no GPU on this machine)"
    if lib is not None:
        try:
            return NvmlReader(lib, device)
        except Exception as err:
            problem = f"NVML found no GPU {device}: {err}"
    if url:
        return ServerStatsReader(url)
    raise NoGpuError(
        f"{problem}. Without a GPU, pass the URL of a running labkit server (Python: "
        "UtilizationSampler(url='http://127.0.0.1:8000'); CLI: labkit monitor --url "
        f"http://127.0.0.1:8000) to record its inference worker's busy % instead "
        f"({CPU_MODE_LABEL})."
    )


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
