"""A scripted stand-in for the `pynvml` module, for unit tests of the sampling logic only.

Each NVML call returns the next value of its script (the last one repeats), raises the NVML error
scripted for that call number, or raises NOT_SUPPORTED when the call is listed as unsupported.
`calls` counts how often each function was called, so tests can check that an unsupported
metric is asked for once and then skipped.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

NOT_SUPPORTED = 3
UNKNOWN = 999

DEFAULT = {
    "gpu_util": 50, "mem_util": 10, "mem_used": 7e9, "mem_total": 80e9, "power_mw": 300_000,
    "power_avg_mw": 250_000, "sm_clock": 1980, "temp": 40,
    "sm_activity": 30.0, "sm_occupancy": 20.0, "tensor_activity": 5.0, "dram_bw": 12.0,
}


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(f"fake NVML error {value}")
        self.value = value


class _MetricsGet:
    def __init__(self) -> None:
        self.version = 0
        self.numMetrics = 0
        self.sample1 = self.sample2 = None
        self.metrics = [SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(8)]


class FakeNvml:
    NVMLError = NVMLError
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED
    NVML_ERROR_FUNCTION_NOT_FOUND = 13
    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0
    NVML_FI_DEV_POWER_INSTANT = 186
    NVML_GPM_METRIC_SM_UTIL = 2
    NVML_GPM_METRIC_SM_OCCUPANCY = 3
    NVML_GPM_METRIC_ANY_TENSOR_UTIL = 5
    NVML_GPM_METRIC_DRAM_BW_UTIL = 10
    NVML_GPM_METRICS_GET_VERSION = 1
    c_nvmlGpmMetricsGet_t = _MetricsGet

    def __init__(
        self,
        script: list[dict[str, Any]] | None = None,
        *,
        gpm: bool = True,
        unsupported: set[str] = frozenset(),
        errors: dict[str, set[int]] | None = None,
        gpm_unsupported_metrics: set[str] = frozenset(),
        name: str = "Fake GPU 80GB",
    ) -> None:
        self.script = [{**DEFAULT, **step} for step in (script or [{}])]
        self.gpm = gpm
        self.unsupported = set(unsupported)
        self.errors = errors or {}
        self.gpm_unsupported_metrics = set(gpm_unsupported_metrics)
        self.name = name
        self.calls: Counter[str] = Counter()
        self.freed = 0

    def _step(self, fn: str) -> dict[str, Any]:
        n = self.calls[fn]
        self.calls[fn] += 1
        if fn in self.unsupported:
            raise NVMLError(NOT_SUPPORTED)
        if n in self.errors.get(fn, ()):
            raise NVMLError(UNKNOWN)
        return self.script[min(n, len(self.script) - 1)]

    def _value(self, fn: str, key: str) -> Any:
        value = self._step(fn)[key]
        if value is None:  # a scripted failure for one value
            raise NVMLError(UNKNOWN)
        return value

    # -- device
    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        if index != 0:
            raise NVMLError(2)  # INVALID_ARGUMENT, as real NVML for a missing index
        return "handle0"

    def nvmlDeviceGetName(self, handle) -> str:
        return self.name

    def nvmlDeviceGetUtilizationRates(self, handle):
        step = self._step("nvmlDeviceGetUtilizationRates")
        if step["gpu_util"] is None:
            raise NVMLError(UNKNOWN)
        return SimpleNamespace(gpu=step["gpu_util"], memory=step["mem_util"])

    def nvmlDeviceGetMemoryInfo(self, handle):
        step = self._step("nvmlDeviceGetMemoryInfo")
        return SimpleNamespace(used=step["mem_used"], total=step["mem_total"])

    def nvmlDeviceGetFieldValues(self, handle, field_ids):
        step = self._step("nvmlDeviceGetFieldValues")
        if "power_instant_field" in self.unsupported:  # call works, field says NOT_SUPPORTED
            return [SimpleNamespace(nvmlReturn=NOT_SUPPORTED, valueType=1,
                                    value=SimpleNamespace(uiVal=0))]
        return [SimpleNamespace(nvmlReturn=0, valueType=1,
                                value=SimpleNamespace(uiVal=step["power_mw"]))]

    def nvmlDeviceGetPowerUsage(self, handle) -> int:
        return self._value("nvmlDeviceGetPowerUsage", "power_avg_mw")

    def nvmlDeviceGetClockInfo(self, handle, kind) -> int:
        return self._value("nvmlDeviceGetClockInfo", "sm_clock")

    def nvmlDeviceGetTemperature(self, handle, sensor) -> int:
        return self._value("nvmlDeviceGetTemperature", "temp")

    # -- GPM
    def nvmlGpmQueryDeviceSupport(self, handle):
        self.calls["nvmlGpmQueryDeviceSupport"] += 1
        return SimpleNamespace(isSupportedDevice=int(self.gpm))

    def nvmlGpmSampleAlloc(self):
        return object()

    def nvmlGpmSampleFree(self, sample) -> None:
        self.freed += 1

    def nvmlGpmSampleGet(self, handle, sample):
        self._step("nvmlGpmSampleGet")
        return sample

    def nvmlGpmMetricsGet(self, request):
        step = self._step("nvmlGpmMetricsGet")
        by_id = {FakeNvml.NVML_GPM_METRIC_SM_UTIL: "sm_activity",
                 FakeNvml.NVML_GPM_METRIC_SM_OCCUPANCY: "sm_occupancy",
                 FakeNvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL: "tensor_activity",
                 FakeNvml.NVML_GPM_METRIC_DRAM_BW_UTIL: "dram_bw"}
        assert request.version == FakeNvml.NVML_GPM_METRICS_GET_VERSION
        assert request.sample1 is not request.sample2
        for metric in request.metrics[: request.numMetrics]:
            key = by_id[metric.metricId]
            if key in self.gpm_unsupported_metrics:
                metric.nvmlReturn = NOT_SUPPORTED
            elif step[key] is None:
                metric.nvmlReturn = UNKNOWN
            else:
                metric.nvmlReturn, metric.value = 0, float(step[key])
        return request


class FakeClock:
    """A manual clock for the NVML backend's GPM gap logic; sleep() advances it."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


@contextmanager
def scripted_stats_server() -> Iterator[tuple[str, list[dict]]]:
    """A tiny HTTP server whose GET /stats returns the next scripted 'server' block (then {}),
    or a scripted str as the whole body. Yields (base URL, script list to fill)."""
    script: list[dict | str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            item = script.pop(0) if script else {}
            body = item if isinstance(item, str) else json.dumps({"gpu_name": None,
                                                                  "server": item})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_port}", script
    finally:
        httpd.shutdown()
        httpd.server_close()
