"""Serve the same load under different set-ups and measure each: the engine of notebooks 06/07
and `benchmarks/serving.py`. Every row is measured here: load-test figures from the client,
utilization and GPM activity from the sampler over exactly that load test's window."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from labkit import client, gpu, loadtest
from labkit.launcher import launch, launch_many

SEED_PHASE3_FACTOR = 3.0  # the seed's "3x throughput" promise for GPU sharing
MIN_REQUESTS = 8


@dataclass
class Sweep:
    model: str
    device: str
    rows: list[dict] = field(default_factory=list)


def _server_options(mode: str, max_batch_size: int, max_wait_ms: float) -> dict:
    if mode != "batched":
        return {"mode": mode}
    return {"mode": mode, "extra_args": ["--max-batch-size", str(max_batch_size),
                                         "--max-wait-ms", str(max_wait_ms)]}


def _sampler(url: str) -> gpu.Sampler:
    return gpu.Sampler(interval=0.1, url=None if gpu.nvml() else url)


def measure(urls: list[str], sampler: gpu.Sampler, concurrency: int, requests: int,
            max_tokens: int, **labels) -> dict:
    """One load test against `urls` (round-robin), with the sampler's view of its window."""
    start = time.perf_counter()
    result = loadtest.run(urls, concurrency=concurrency, requests=requests,
                          max_tokens=max_tokens, temperature=0.7, progress=False)
    end = time.perf_counter()
    s = result.summary()
    util = sampler.summary(start=start, end=end)
    return {
        **labels, "concurrency": concurrency, "requests": requests,
        "success_rate": s["success_rate"], "requests_per_second": s["requests_per_sec"],
        "output_tokens_per_sec": s["output_tokens_per_sec"],
        "p50_ms": s["latency_ms"]["p50"], "p95_ms": s["latency_ms"]["p95"],
        "queue_ms": s["queue_time_ms"]["mean"],
        "mean_util": util["mean_util"], "idle_fraction": util["idle_fraction"],
        "sm_activity_mean": util.get("sm_activity_mean"),
        "tensor_activity_mean": util.get("tensor_activity_mean"),
        "gpu_memory_used_gb": util.get("mem_used_max_gb"),
        "utilization_source": util["source"],
    }


def run(model: str, mode: str, levels: list[int], *, rounds: int = 2, max_tokens: int = 150,
        max_batch_size: int = 64, max_wait_ms: float = 5.0, warmup: bool = True) -> Sweep:
    """Start one `mode` server and load it at each concurrency level in turn."""
    with launch(model=model, **_server_options(mode, max_batch_size, max_wait_ms)) as srv:
        health = client.get(srv.url + "/health").body
        sweep = Sweep(health["model"], health["gpu_name"] or "CPU")
        if warmup:  # batch shapes the server has not seen yet pay one-off costs
            loadtest.run(srv.url, concurrency=max(levels), requests=max(levels),
                         max_tokens=8, progress=False)
        with _sampler(srv.url) as sampler:
            for c in levels:
                before = client.get(srv.url + "/stats").body["server"]
                row = measure([srv.url + "/generate"], sampler, c,
                              max(MIN_REQUESTS, rounds * c), max_tokens, mode=mode, series=mode)
                after = client.get(srv.url + "/stats").body["server"]
                row["mean_batch_size"] = _mean_batch(before, after)
                sweep.rows.append(row)
    return sweep


def run_shared(model: str, servers: int, mode: str, concurrency: int, requests: int,
               max_tokens: int, max_batch_size: int = 64) -> dict:
    """`servers` separate server processes on one GPU, the load spread over them round-robin."""
    with launch_many(servers, model=model, **_server_options(mode, max_batch_size, 5.0)) as srvs:
        urls = [s.url + "/generate" for s in srvs]
        loadtest.run(urls, concurrency=concurrency, requests=concurrency, max_tokens=8,
                     progress=False)  # warm-up
        with _sampler(srvs[0].url) as sampler:
            return measure(urls, sampler, concurrency, requests, max_tokens, mode=mode,
                           servers=servers, series=f"{servers} x {mode}")


def _mean_batch(before: dict, after: dict) -> float | None:
    """Requests per batch over one load test, from the server's counters (batched mode)."""
    if "batches" not in after:
        return None
    batches = after["batches"] - before.get("batches", 0)
    served = after["requests_served"] - before["requests_served"]
    return served / batches if batches else None


def seed_phase3_claim(sequential_rows: list[dict]) -> float | None:
    """The seed's promise, 3x the best sequential throughput, in requests per second."""
    if not sequential_rows:
        return None
    return SEED_PHASE3_FACTOR * max(r["requests_per_second"] for r in sequential_rows)


def table(rows: list[dict]) -> str:
    head = (f"{'mode':<11}{'conc':>5}{'req/s':>8}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}"
            f"{'util %':>8}{'SM %':>7}{'batch':>7}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['mode']:<11}{r['concurrency']:>5}{r['requests_per_second']:>8.2f}"
                     f"{r['output_tokens_per_sec']:>9.1f}{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}"
                     f"{_pct(r['mean_util']):>8}{_pct(r.get('sm_activity_mean')):>7}"
                     f"{_num(r.get('mean_batch_size')):>7}")
    return "\n".join(lines)


def shared_table(rows: list[dict]) -> str:
    head = (f"{'set-up':<16}{'req/s':>8}{'tok/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'util %':>8}"
            f"{'SM %':>7}{'GPU GB':>8}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['series']:<16}{r['requests_per_second']:>8.2f}"
                     f"{r['output_tokens_per_sec']:>9.1f}{r['p50_ms']:>9.0f}{r['p95_ms']:>9.0f}"
                     f"{_pct(r['mean_util']):>8}{_pct(r.get('sm_activity_mean')):>7}"
                     f"{_num(r.get('gpu_memory_used_gb')):>8}")
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"


def _num(value) -> str:
    return "-" if value is None else f"{value:.1f}"
