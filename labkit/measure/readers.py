"""Where the utilization sampler's values come from: NVML on a GPU (utilization, memory, power,
clocks, and GPM's SM, tensor and DRAM activity on Hopper and newer), or, without one, a labkit
server's busy share and queue from its `/stats`. Each reader returns one row of values per
`read()`; a metric the GPU or driver lacks is missing (None), never zero. The sampler that
calls them ten times a second is `labkit.measure.utilization`."""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Protocol

from labkit.measure import gpu
from labkit.measure.auth import api_key_from_env, auth_headers

GPM_MIN_GAP_S = 0.1  # NVML: GPM samples should be >= 100 ms apart (internal refresh rate)
CPU_MODE_LABEL = "CPU mode: inference worker busy %, not GPU utilization"
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


# The paths of a labkit server's endpoints: any URL given to `labkit loadtest` (either API) or
# read off the server's own messages names the same server, whose /stats is at its root.
ENDPOINT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1", "/generate",
                  "/stats", "/health", "/metrics")


def stats_url(url: str) -> str:
    """'http://host:8000', '.../generate', '.../v1', '.../v1/completions' or '.../stats' ->
    'http://host:8000/stats'."""
    base = url.rstrip("/")
    for suffix in ENDPOINT_PATHS:  # longest first: only the endpoint's own path goes
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
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
        """The /stats body; ValueError, like a body that is no JSON, when it or its "server"
        block is not an object (valid JSON from something else at that address)."""
        request = urllib.request.Request(self.url, headers=auth_headers(api_key_from_env()))
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            stats = json.load(response)
        if not isinstance(stats, dict) or not isinstance(stats.get("server") or {}, dict):
            raise ValueError(f"not a labkit server's /stats (a JSON object with a \"server\" "
                             f"object): {json.dumps(stats)[:80]}")
        return stats

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
