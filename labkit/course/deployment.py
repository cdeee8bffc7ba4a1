"""Notebook 07's closing section: its sharing measurements, turned into three Kubernetes choices.

Notebook 07 measures rows like ``{"series": "4 x sequential", "mode": "sequential", "servers": 4,
"requests_per_second": ..., "gpu_memory_used_gb": ... (None on a CPU), "server_rss_gb": ...}``.
From those rows and the hourly price of one GPU that the learner enters, `kubernetes_choices`
builds:

(a) **replicas, one GPU each**: N pods of one sequential server, each on its own GPU
    (``nvidia.com/gpu: 1``, no sharing). Throughput is N x the measured "1 x sequential" row: a
    projection (pods on separate GPUs do not slow each other down), not a measurement.
    By default N is the smallest count that matches the batched server's measured throughput.
(b) **time-sliced pods on one GPU**: the device plugin's time-slicing, k pods on one card. The
    measured row of the best k-server sequential set-up (k >= 2), on one GPU.
(c) **one batched server per GPU**: the measured batched row, on one GPU.

Cost per 1,000 requests = GPUs x hourly price / 3600 / (requests per second) x 1000, the formula
of `labkit.measure.cost.cost_per_1000_requests` applied to the choice's GPU count. Every figure
comes from the rows passed in; this module holds no measured numbers.
"""

from __future__ import annotations

import math

REPLICAS = "replicas, one GPU each"
TIME_SLICED = "time-sliced pods, one GPU"
BATCHED = "one batched server per GPU"

_REQUIRED = ("series", "mode", "servers", "requests_per_second", "gpu_memory_used_gb",
             "server_rss_gb")


def kubernetes_choices(rows: list[dict], hourly_price: float,
                       replicas: int | None = None) -> list[dict]:
    """The three choices (a), (b), (c) above, as dicts, from notebook 07's measured `rows`.

    `hourly_price`: dollars per GPU-hour, > 0. `replicas`: the N of choice (a); default the
    smallest N whose projected throughput reaches the batched server's measured throughput.
    Raises ValueError, saying what is missing or wrong, on a bad price, bad `replicas`, or rows
    without a "1 x sequential" row, a k-server sequential row (k >= 2) or a batched row.
    """
    price = _check_price(hourly_price)
    rows = _check_rows(rows)
    sequential = [r for r in rows if r["mode"] == "sequential"]
    one = _best([r for r in sequential if r["servers"] == 1],
                'a "1 x sequential" row (one sequential server): keep 1 in SERVER_COUNTS')
    shared = _best([r for r in sequential if r["servers"] >= 2],
                   'a sequential row with 2 or more servers sharing the device: put 2 or more '
                   'in SERVER_COUNTS')
    batched = _best([r for r in rows if r["mode"] in ("batched", "continuous")],
                    'a batched (or continuous) server row, e.g. "1 x batched"')

    if replicas is None:
        # A small tolerance, so that 0.9 / 0.3 (3.0000000000000004 in floating point) gives 3.
        replicas = max(1, math.ceil(batched["requests_per_second"]
                                    / one["requests_per_second"] - 1e-9))
    elif isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas must be a whole number of pods >= 1, got {replicas!r}")

    return [
        _choice("a", REPLICAS, one, price, pods=replicas, gpus=replicas,
                requests_per_second=replicas * one["requests_per_second"], projected=True,
                kubernetes=f"Deployment with {replicas} replica(s), nvidia.com/gpu: 1 each, "
                           "no time-slicing"),
        _choice("b", TIME_SLICED, shared, price, pods=shared["servers"], gpus=1,
                requests_per_second=shared["requests_per_second"], projected=False,
                kubernetes=f"{shared['servers']} pods with nvidia.com/gpu: 1 on one GPU "
                           f"(device plugin time-slicing, replicas >= {shared['servers']})"),
        _choice("c", BATCHED, batched, price, pods=1, gpus=1,
                requests_per_second=batched["requests_per_second"], projected=False,
                kubernetes=f"1 pod running labkit serve --mode {batched['mode']}, "
                           "nvidia.com/gpu: 1"),
    ]


def choices_table(choices: list[dict]) -> str:
    """`kubernetes_choices`' result as a small text table, with where each figure comes from."""
    if not choices:
        raise ValueError("no choices to show: pass the list kubernetes_choices returned")
    price = choices[0]["hourly_price"]
    head = (f"{'Kubernetes choice':<34}{'pods':>5}{'GPUs':>6}{'req/s':>9}"
            f"{'GPU memory':>14}{'RSS/pod GB':>12}{'$/1k req':>10}")
    lines = [
        f"Kubernetes choices from the rows this notebook measured, at ${price:,.2f} per GPU-hour "
        "(the price you entered)",
        head,
    ]
    for c in choices:
        label = f"({c['key']}) {c['choice']}"
        rss = "-" if c["host_memory_per_pod_gb"] is None else f"{c['host_memory_per_pod_gb']:.2f}"
        lines.append(f"{label:<34}{c['pods']:>5}{c['gpus']:>6}{c['requests_per_second']:>9.2f}"
                     f"{c['memory_per_gpu']:>14}{rss:>12}{c['cost_per_1000_requests']:>10.4f}")
    lines.append("")
    for c in choices:
        how = (f"req/s projected: {c['pods']} x the measured {c['from_series']!r} row, "
               "memory per GPU: that row's" if c["projected"]
               else f"req/s and memory measured: the {c['from_series']!r} row")
        lines.append(f"({c['key']}) {c['kubernetes']}; {how}")
    lines.append("GPU memory: in use on each GPU at the row's peak. RSS/pod: host memory of one "
                 "server process. $/1k req = GPUs x price / 3600 / req/s x 1000.")
    if any(c["memory_per_gpu_gb"] is None for c in choices):
        lines.append("Measured without a GPU (CPU mode): these req/s come from CPU processes and "
                     "say nothing about a GPU; run notebook 07 on a GPU for real figures.")
    return "\n".join(lines)


# --- helpers -------------------------------------------------------------------------------------

def _choice(key: str, name: str, row: dict, price: float, *, pods: int, gpus: int,
            requests_per_second: float, projected: bool, kubernetes: str) -> dict:
    memory = row["gpu_memory_used_gb"]
    rss = row["server_rss_gb"]
    cost_per_hour = gpus * price
    return {
        "key": key,
        "choice": name,
        "kubernetes": kubernetes,
        "from_series": row["series"],
        "projected": projected,
        "pods": pods,
        "gpus": gpus,
        "requests_per_second": requests_per_second,
        "memory_per_gpu_gb": memory,
        "memory_per_gpu": "n/a (CPU)" if memory is None else f"{memory:.1f} GB",
        "host_memory_per_pod_gb": None if rss is None else rss / row["servers"],
        "hourly_price": price,
        "cost_per_hour": cost_per_hour,
        "cost_per_1000_requests": cost_per_hour / 3600 / requests_per_second * 1000,
    }


def _best(candidates: list[dict], what: str) -> dict:
    if not candidates:
        raise ValueError(f"notebook 07's rows have no {what}")
    return max(candidates, key=lambda r: r["requests_per_second"])


def _check_price(hourly_price) -> float:
    try:
        price = float(hourly_price)
    except (TypeError, ValueError):
        price = math.nan
    if isinstance(hourly_price, bool) or not (math.isfinite(price) and price > 0):
        raise ValueError("hourly_price must be a positive number of dollars per GPU-hour "
                         f"(e.g. 3.0), got {hourly_price!r}")
    return price


def _check_rows(rows) -> list[dict]:
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("rows must be the non-empty list of dicts notebook 07 measures "
                         f"(its `rows`), got {rows!r}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"rows[{i}] must be a dict, got {type(row).__name__}")
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ValueError(f"rows[{i}] ({row.get('series', '?')!r}) lacks {missing}: pass the "
                             "rows notebook 07 measures")
        rps = row["requests_per_second"]
        if not (isinstance(rps, (int, float)) and math.isfinite(rps) and rps > 0):
            raise ValueError(f"rows[{i}] ({row['series']!r}): requests_per_second must be a "
                             f"measured throughput > 0, got {rps!r}")
        if not (isinstance(row["servers"], int) and row["servers"] >= 1):
            raise ValueError(f"rows[{i}] ({row['series']!r}): servers must be a whole number "
                             f">= 1, got {row['servers']!r}")
    return list(rows)


__all__ = ["BATCHED", "REPLICAS", "TIME_SLICED", "choices_table", "kubernetes_choices"]
