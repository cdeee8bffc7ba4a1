"""The serving experiments of notebooks 03–07 and `benchmarks/serving.py`: start servers, load
them, and measure every row. Load-test figures come from the client, utilization and GPM activity
from the sampler over exactly that load test's window, batch sizes and busy time from the servers'
own /stats counters before and after it.

Batched servers get `--max-wait-ms 50` here, not the server's 5 ms default. A closed-loop load
test answers every row of a batch at the same moment, and its clients' next requests then reach
the server one after another, over several milliseconds when client and server share a small
machine. A window shorter than that closes before they are all in and splits them over two
half-size batches; 50 ms adds about 1 % to a 150-token batch on a GPU, and `mean_batch_size` in
every row shows whether batches filled.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from labkit.measure import gpu, loadtest, utilization
from labkit.serve import client
from labkit.serve.launcher import ServerProcess, launch, launch_many

SEED_PHASE3_FACTOR = 3.0  # the seed's "3x throughput" promise for GPU sharing
MIN_REQUESTS = 8
SWEEP_MAX_WAIT_MS = 50.0


@dataclass
class Sweep:
    model: str
    device: str
    rows: list[dict] = field(default_factory=list)
    timeline: object | None = None  # the final live-timeline Figure, when run(live=True)


def batched_flags(max_batch_size: int, max_wait_ms: float = SWEEP_MAX_WAIT_MS,
                  cuda_graphs: bool | None = None) -> list[str]:
    """`labkit serve --mode batched` flags for the course's batched servers (notebooks 06-08)."""
    flags = ["--max-batch-size", str(max_batch_size), "--max-wait-ms", f"{max_wait_ms:g}"]
    if cuda_graphs is not None:
        flags.append("--cuda-graphs" if cuda_graphs else "--no-cuda-graphs")
    return flags


def _server_options(mode: str, max_batch_size: int, max_wait_ms: float,
                    cuda_graphs: bool = True) -> dict:
    if mode != "batched":
        return {"mode": mode}
    return {"mode": mode, "extra_args": batched_flags(max_batch_size, max_wait_ms, cuda_graphs)}


def _sampler(url: str) -> utilization.UtilizationSampler:
    return utilization.UtilizationSampler(interval=0.1, url=None if gpu.nvml() else url)


def _server_counters(servers: list[ServerProcess]) -> list[dict]:
    return [client.get(s.url + "/stats").body["server"] for s in servers]


def _rss_gb(pid: int | None) -> float | None:
    """Resident memory of a server process (Linux /proc), GB: its weights live there on a CPU."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError):
        pass
    return None


def measure(procs: list[ServerProcess], sampler: utilization.UtilizationSampler, concurrency: int,
            requests: int, max_tokens: int, watch=None, **labels) -> dict:
    """One load test spread over the server processes `procs` (round-robin), with the sampler's
    view of its window and the servers' counters. `watch` runs the load test (a LiveTimeline's
    watch, to draw it)."""
    urls = [s.url + "/generate" for s in procs]
    before = _server_counters(procs)
    sampler.mark(f"c={concurrency}")
    start = time.perf_counter()
    result = (watch or (lambda fn, *a, **k: fn(*a, **k)))(
        loadtest.run, urls, concurrency=concurrency, requests=requests, max_tokens=max_tokens,
        temperature=0.7, progress=False)
    end = time.perf_counter()
    after = _server_counters(procs)
    s = result.summary()
    util = sampler.summary(start=start, end=end)
    batches = sum(a["batches"] - b["batches"] for a, b in zip(after, before, strict=True))
    generated = sum(a["requests_served"] + a["requests_failed"] - b["requests_served"]
                    - b["requests_failed"] for a, b in zip(after, before, strict=True))
    busy = [(a["busy_seconds"] - b["busy_seconds"]) / (a["uptime_s"] - b["uptime_s"])
            for a, b in zip(after, before, strict=True)]
    rss = [_rss_gb(srv.pid) for srv in procs]
    generation = [r.inference_time_ms for r in result.ok_records]
    return {
        **labels, "concurrency": concurrency, "requests": requests,
        "success_rate": s["success_rate"], "requests_per_second": s["requests_per_sec"],
        "output_tokens_per_sec": s["output_tokens_per_sec"],
        "p50_ms": s["latency_ms"]["p50"], "p95_ms": s["latency_ms"]["p95"],
        "queue_ms": s["queue_time_ms"]["mean"],
        # the server's own generation time per request: what a lone request costs the model
        "generation_ms": sum(generation) / len(generation) if generation else None,
        "mean_util": util["mean_util"], "idle_fraction": util["idle_fraction"],
        "sm_activity_mean": util.get("sm_activity_mean"),
        "tensor_activity_mean": util.get("tensor_activity_mean"),
        "gpu_memory_used_gb": util.get("mem_used_max_gb"),
        "utilization_source": util["source"],
        "mean_batch_size": generated / batches if batches else None,
        "cuda_graphs": all(a.get("cuda_graphs", False) for a in after),
        "server_busy_pct": 100 * sum(busy) / len(busy),  # mean over the servers
        "server_rss_gb": sum(rss) if None not in rss else None,  # all servers together
    }


def sweep(model: str, mode: str, levels: list[int], *, rounds: int = 2,
          min_requests: int = MIN_REQUESTS, max_tokens: int = 150, max_batch_size: int = 64,
          max_wait_ms: float = SWEEP_MAX_WAIT_MS, cuda_graphs: bool = True, warmup: bool = True,
          live: bool = False, deadline: float | None = None, on_row=None) -> Sweep:
    """Start one `mode` server and load it at each concurrency level in turn, with
    max(min_requests, rounds x concurrency) requests per level. `live` draws the utilization
    timeline while it runs (in a notebook). Levels left when time.perf_counter() passes
    `deadline` are skipped (the first level always runs). `on_row(row)` sees each row as it
    is measured. `cuda_graphs=False` serves batches eagerly on a GPU (series "batched, eager")."""
    series = mode if cuda_graphs or mode != "batched" else f"{mode}, eager"
    options = _server_options(mode, max_batch_size, max_wait_ms, cuda_graphs)
    with launch(model=model, **options) as srv:
        health = client.get(srv.url + "/health").body
        sweep = Sweep(health["model"], health["gpu_name"] or "CPU")
        if warmup:  # batch shapes the server has not seen yet pay one-off costs
            loadtest.run(srv.url, concurrency=max(levels), requests=max(levels),
                         max_tokens=8, progress=False)
        with ExitStack() as stack:
            sampler = stack.enter_context(_sampler(srv.url))
            timeline = None
            if live:
                from labkit.measure import plots  # matplotlib: only where a timeline is drawn

                timeline = stack.enter_context(plots.LiveTimeline(
                    sampler, model=sweep.model, refresh=2.0,
                    title=f"{mode} server, concurrency {', '.join(map(str, levels))}"))
            for c in levels:
                if sweep.rows and deadline is not None and time.perf_counter() > deadline:
                    break
                sweep.rows.append(measure(
                    [srv], sampler, c, max(min_requests, rounds * c), max_tokens,
                    watch=timeline.watch if timeline else None, mode=mode, series=series))
                if on_row is not None:
                    on_row(sweep.rows[-1])
        if timeline is not None:
            sweep.timeline = timeline.figure
    return sweep


def share_one_gpu(model: str, servers: int, mode: str, concurrency: int, requests: int,
               max_tokens: int, max_batch_size: int = 64,
               max_wait_ms: float = SWEEP_MAX_WAIT_MS) -> dict:
    """`servers` separate server processes on one GPU, the load spread over them round-robin."""
    with launch_many(servers, model=model,
                     **_server_options(mode, max_batch_size, max_wait_ms)) as srvs:
        urls = [s.url + "/generate" for s in srvs]
        loadtest.run(urls, concurrency=concurrency, requests=concurrency, max_tokens=8,
                     progress=False)  # warm-up
        with _sampler(srvs[0].url) as sampler:
            return measure(srvs, sampler, concurrency, requests, max_tokens, mode=mode,
                           servers=servers, series=f"{servers} x {mode}")


def seed_phase3_claim(sequential_rows: list[dict]) -> float | None:
    """The seed's promise, 3x the best sequential throughput, in requests per second."""
    if not sequential_rows:
        return None
    return SEED_PHASE3_FACTOR * max(r["requests_per_second"] for r in sequential_rows)


def _columns(rows: list[dict], spec: list[tuple[str, int, object]]) -> list[str]:
    """A header and one line per row; `spec` is (header, width, row -> text), the first column
    left-aligned."""
    def cell(i: int, width: int, text: str) -> str:
        return f"{text:<{width}}" if i == 0 else f"{text:>{width}}"

    lines = ["".join(cell(i, w, h) for i, (h, w, _) in enumerate(spec))]
    lines += ["".join(cell(i, w, str(fn(r))) for i, (_, w, fn) in enumerate(spec)) for r in rows]
    return lines


def _series(r: dict) -> str:
    return r.get("series", r["mode"])


LOAD_COLUMNS = [
    ("req/s", 8, lambda r: f"{r['requests_per_second']:.2f}"),
    ("tok/s", 9, lambda r: f"{r['output_tokens_per_sec']:.1f}"),
    ("p50 ms", 9, lambda r: f"{r['p50_ms']:.0f}"),
    ("p95 ms", 9, lambda r: f"{r['p95_ms']:.0f}"),
]
UTIL = ("util %", 8, lambda r: _pct(r["mean_util"]))
SM = ("SM %", 7, lambda r: _pct(r.get("sm_activity_mean")))
BATCH = ("batch", 7, lambda r: _num(r.get("mean_batch_size")))


def table(rows: list[dict]) -> str:
    """A sweep's rows: load-test figures, the server's generation time, utilization, batch."""
    spec = [("mode", 15, _series), ("conc", 5, lambda r: r["concurrency"]), *LOAD_COLUMNS,
            ("gen ms", 8, lambda r: _num(r.get("generation_ms"), 0)), UTIL, SM, BATCH]
    return "\n".join(_columns(rows, spec)) + _util_note(rows) + (
        "\ngen ms = the server's generation time per request (inference_time_ms), queueing "
        "left out")


def shared_table(rows: list[dict]) -> str:
    """Notebook 07's set-ups: load-test figures, utilization, busy share and memory."""
    spec = [("set-up", 16, _series), *LOAD_COLUMNS, UTIL, SM,
            ("busy %", 8, lambda r: _pct(r.get("server_busy_pct"))),
            ("GPU GB", 8, lambda r: _num(r.get("gpu_memory_used_gb"))),
            ("RSS GB", 8, lambda r: _num(r.get("server_rss_gb"), 2))]
    return "\n".join(_columns(rows, spec)) + _util_note(rows)


def activity_table(rows: list[dict]) -> str:
    """Utilization (any kernel running) next to how much of the chip worked (GPM)."""
    spec = [("mode", 15, _series), ("conc", 5, lambda r: r["concurrency"]), UTIL, SM,
            ("tensor %", 10, lambda r: _pct(r.get("tensor_activity_mean"))), BATCH]
    return "\n".join(_columns(rows, spec)) + _util_note(rows)


def bad_generate_requests(context_tokens: int) -> dict[str, dict]:
    """One malformed /generate request of each kind notebook 03 sends, as `client.call`
    keyword arguments; `context_tokens` sizes the prompt that cannot fit."""
    return {
        "not JSON": dict(data=b"{prompt: hi"),
        "JSON list": dict(payload=["Suggest a routine"]),
        "missing prompt": dict(payload={"max_tokens": 10}),
        "empty prompt": dict(payload={"prompt": "  "}),
        "max_tokens = 0": dict(payload={"prompt": "hi", "max_tokens": 0}),
        "max_tokens too big": dict(payload={"prompt": "hi", "max_tokens": 100000}),
        "temperature = 5": dict(payload={"prompt": "hi", "temperature": 5}),
        "top_p = 0": dict(payload={"prompt": "hi", "top_p": 0}),
        "typo in a field": dict(payload={"prompt": "hi", "max_token": 10}),
        "prompt > context": dict(payload={"prompt": "skin " * (context_tokens + 1),
                                          "max_tokens": 10}),
        "body over 1 MiB": dict(payload={"prompt": "dry skin " * 200000, "max_tokens": 10}),
        "wrong content type": dict(data=b"prompt=hi", content_type="text/plain"),
    }


def send_bad_requests(url: str, context_tokens: int) -> list[dict]:
    """Send each of `bad_generate_requests` to a server's /generate, then a GET to /generate and
    a request to a path that does not exist: one row each, with the status and the whole error
    message the server sent."""
    sends = [("POST", "/generate", name, kwargs)
             for name, kwargs in bad_generate_requests(context_tokens).items()]
    sends += [("GET", "/generate", "GET /generate", {}), ("GET", "/nope", "unknown path", {})]
    rows = []
    for method, path, name, kwargs in sends:
        reply = client.call(method, url + path, **kwargs)
        error = reply.body.get("error") if isinstance(reply.body, dict) else reply.body
        rows.append({"case": name, "method": method, "path": path, "status": reply.status,
                     "error": str(error)})
    return rows


def bad_requests_table(rows: list[dict], width: int = 100) -> str:
    """The rows of `send_bad_requests`: case, status, and the server's message in full, wrapped
    at word boundaries."""
    import textwrap

    lines = [f"{'request':<20} {'status':>6}  message"]
    for r in rows:
        wrapped = textwrap.wrap(r["error"], width - 29) or [""]
        lines.append(f"{r['case']:<20} {r['status']:>6}  {wrapped[0]}")
        lines += [f"{'':<29}{line}" for line in wrapped[1:]]
    return "\n".join(lines)


def stream_arrivals_table(arrivals_ms: list[float], texts: list[str], shown: int = 12) -> str:
    """When each streamed chunk reached the client (ms after the request was sent) and its
    text: the first ones, then evenly spaced, the last; and the gaps between them."""
    import numpy as np

    if not arrivals_ms:
        return "no chunk arrived"
    picked = sorted(set(range(min(4, len(arrivals_ms))))
                    | {round(i) for i in np.linspace(0, len(arrivals_ms) - 1, shown - 4)})
    lines = [f"{'chunk':>5} {'arrived ms':>11}  text"]
    lines += [f"{i + 1:>5} {arrivals_ms[i]:>11.1f}  {texts[i]!r}" for i in picked]
    gaps = np.diff(arrivals_ms)
    if len(gaps):
        lines.append(f"{len(arrivals_ms)} chunks from {arrivals_ms[0]:.1f} to "
                     f"{arrivals_ms[-1]:.1f} ms after sending; gap between chunks: median "
                     f"{np.median(gaps):.1f} ms, max {gaps.max():.1f} ms")
    return "\n".join(lines)


SERVING_COLUMNS = [
    ("device", 24, lambda r: r["device"]), ("tokens", 7, lambda r: r["tokens_generated"]),
    ("generation ms", 14, lambda r: f"{r['inference_time_ms']:.0f}"),
    ("ms/token", 10, lambda r: f"{r['ms_per_token']:.2f}"),
    ("stream: 1st chunk ms", 21, lambda r: f"{r['stream_first_ms']:.1f}"),
    ("chunks", 7, lambda r: r["stream_chunks"]),
    ("health max ms", 14, lambda r: f"{r['health_max_ms']:.1f}")]


def serving_table(rows: list[dict]) -> str:
    """Notebook 03's measured figures, one row per run (yours, or the GPU reference's)."""
    return "\n".join(_columns(rows, SERVING_COLUMNS))


def serving_row(reply: dict, arrivals_ms: list[float], health_ms: list[float]) -> dict:
    """Notebook 03's figures: the seed's request, the streamed one, the health checks."""
    tokens = reply["tokens_generated"]
    return {"device": reply.get("gpu_name") or reply["device"], "tokens_generated": tokens,
            "inference_time_ms": reply["inference_time_ms"],
            "ms_per_token": reply["inference_time_ms"] / max(tokens, 1),
            "stream_first_ms": arrivals_ms[0] if arrivals_ms else math.nan,
            "stream_last_ms": arrivals_ms[-1] if arrivals_ms else math.nan,
            "stream_chunks": len(arrivals_ms), "health_max_ms": max(health_ms),
            "health_median_ms": sorted(health_ms)[len(health_ms) // 2]}


def gpu_memory_during(url: str, load, interval: float = 0.5) -> dict | None:
    """The card's memory in use (GB, from the server's /stats) before, during and after
    `load()`; None without a GPU (CPU mode: no GPU memory to watch)."""
    def used() -> float | None:
        return (client.get(url + "/stats").body["memory"] or {}).get("used_gb")

    before, during = used(), []
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(load)
        while not running.done():
            during.append(used())
            time.sleep(interval)
        running.result()
    if before is None:
        return None
    return {"before": before, "min": min(during, default=before),
            "max": max(during, default=before), "after": used()}


def concurrency_rows(results: dict) -> list[dict]:
    """Notebook 04's rows, one per concurrency level, from {concurrency: LoadTestResult}.
    Service time = mean latency - mean queue time: the time a request spends being generated
    (and answered) once its turn has come."""
    rows = []
    for c in sorted(results):
        s = results[c].summary()
        rows.append({"concurrency": c, "requests": s["successful"],
                     "requests_per_second": s["requests_per_sec"],
                     "p50_ms": s["latency_ms"]["p50"], "p95_ms": s["latency_ms"]["p95"],
                     "mean_ms": s["latency_ms"]["mean"], "queue_ms": s["queue_time_ms"]["mean"],
                     "service_ms": s["latency_ms"]["mean"] - s["queue_time_ms"]["mean"],
                     "ttft_ms": s["ttft_ms"]["mean"]})
    return rows


def concurrency_table(rows: list[dict]) -> str:
    lines = [f"{'conc':>4} {'req/s':>7} {'req/min':>8} {'p50 ms':>8} {'p95 ms':>8} "
             f"{'mean queue ms':>14} {'mean service ms':>16}"]
    for r in rows:
        lines.append(f"{r['concurrency']:>4} {r['requests_per_second']:>7.2f} "
                     f"{60 * r['requests_per_second']:>8.1f} {r['p50_ms']:>8.0f} "
                     f"{r['p95_ms']:>8.0f} {r['queue_ms']:>14.0f} {r['service_ms']:>16.0f}")
    return "\n".join(lines)


def closed_loop_mean_latency(concurrency: int, requests: int, service_ms: float) -> float:
    """The mean latency Little's law gives a closed loop of `concurrency` clients sending
    `requests` in all to a server that generates one at a time, `service_ms` each. Once the
    loop runs, `concurrency` requests are always in the system, so L = λW gives
    W = concurrency x service time. A finite run starts empty, though: its first requests
    wait 0, 1, ..., concurrency - 1 services, which pulls the mean below c x S."""
    c, n = concurrency, requests
    if n <= c:  # all sent at once: they wait 0, 1, ..., n - 1 services
        return service_ms * (n + 1) / 2
    return service_ms * (c * (c + 1) / 2 + (n - c) * c) / n


def littles_law(rows: list[dict]) -> list[dict]:
    """Each level's mean latency as Little's law predicts it from the service time measured at
    that level (`closed_loop_mean_latency`), next to the one measured."""
    out = []
    for r in rows:
        predicted = closed_loop_mean_latency(r["concurrency"], r["requests"], r["service_ms"])
        out.append({"concurrency": r["concurrency"], "requests": r["requests"],
                    "service_ms": r["service_ms"], "steady_ms": r["concurrency"] * r["service_ms"],
                    "predicted_ms": predicted, "measured_ms": r["mean_ms"],
                    "error": r["mean_ms"] / predicted - 1})
    return out


def littles_law_table(rows: list[dict]) -> str:
    lines = [f"{'conc':>4} {'requests':>8} {'service ms':>11} {'c x service':>12} "
             f"{'predicted mean':>15} {'measured mean':>14} {'error':>7}"]
    for r in littles_law(rows):
        lines.append(f"{r['concurrency']:>4} {r['requests']:>8} {r['service_ms']:>11.0f} "
                     f"{r['steady_ms']:>9.0f} ms {r['predicted_ms']:>12.0f} ms "
                     f"{r['measured_ms']:>11.0f} ms {r['error']:>+7.0%}")
    lines.append("predicted: Little's law for this run (its first requests find the queue "
                 "empty); c x service: the same once the loop runs, for a run without end")
    return "\n".join(lines)


# The server's /metrics histograms that notebook 04 reads around a streamed load test.
SERVER_HISTOGRAMS = {"queue": "labkit_request_queue_time_seconds",
                     "ttft": "labkit_time_to_first_token_seconds"}


def server_histograms(metrics_text: str) -> dict[str, tuple[float, float]]:
    """(sum in seconds, count) of each of SERVER_HISTOGRAMS, from a GET /metrics text."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name: s.value for family in text_string_to_metric_families(metrics_text)
               for s in family.samples}
    return {key: (samples[f"{name}_sum"], samples[f"{name}_count"])
            for key, name in SERVER_HISTOGRAMS.items()}


def client_ttft_row(concurrency: int, summary: dict, before: dict, after: dict) -> dict:
    """One level of notebook 04's client-side TTFT table: a streamed load test's summary
    (`LoadTestResult.summary()`, api="openai") next to the server's view of the same requests,
    the mean of each histogram between the `server_histograms` taken `before` and `after` it.
    prefill_ms = server TTFT - queue: from its turn to its first token (tokenization, prefill,
    the first sampled token), what a /generate reply's time_to_first_token_ms counts."""
    def mean_ms(key: str) -> float:
        (sum0, n0), (sum1, n1) = before[key], after[key]
        return 1000 * (sum1 - sum0) / (n1 - n0) if n1 > n0 else math.nan

    queue_ms, server_ttft_ms = mean_ms("queue"), mean_ms("ttft")
    return {"concurrency": concurrency, "requests": summary["total_requests"],
            "successful": summary["successful"], "queue_ms": queue_ms,
            "prefill_ms": server_ttft_ms - queue_ms, "server_ttft_ms": server_ttft_ms,
            "client_ttft_ms": summary["ttft_ms"]["mean"],
            "client_ttft_p95_ms": summary["ttft_ms"]["p95"],
            "itl_ms": summary["itl_ms"]["mean"], "tpot_ms": summary["tpot_ms"]["mean"]}


def client_ttft(url: str, levels: list[int], max_tokens: int, rounds: int = 2,
                temperature: float = 0.7) -> list[dict]:
    """Notebook 04's TTFT as the user sees it: at each concurrency level a closed-loop load test
    of rounds x concurrency requests over the OpenAI API, streamed and timed at the client
    (`loadtest.run(api="openai")`, `labkit loadtest --api openai`), with the server's /metrics
    read before and after it (`client_ttft_row`)."""
    rows = []
    for c in levels:
        before = server_histograms(client.get(url + "/metrics").body)
        result = loadtest.run(url, api="openai", concurrency=c, requests=rounds * c,
                              max_tokens=max_tokens, temperature=temperature, progress=False)
        after = server_histograms(client.get(url + "/metrics").body)
        rows.append(client_ttft_row(c, result.summary(), before, after))
    return rows


def client_ttft_table(rows: list[dict]) -> str:
    """The server's view and the client's of the same streamed requests, one line per level."""
    lines = [f"{'':10} {'in the server (its /metrics)':^31}  |  at the client (streamed)",
             f"{'conc':>4} {'reqs':>5} {'queue ms':>9} {'prefill ms':>11} {'TTFT ms':>9}  |  "
             f"{'TTFT ms':>7} {'p95 ms':>8} {'ITL ms':>8} {'TPOT ms':>8}"]
    for r in rows:
        lines.append(f"{r['concurrency']:>4} {r['requests']:>5} {_ms(r['queue_ms']):>9} "
                     f"{_ms(r['prefill_ms']):>11} {_ms(r['server_ttft_ms']):>9}  |  "
                     f"{_ms(r['client_ttft_ms']):>7} {_ms(r['client_ttft_p95_ms']):>8} "
                     f"{_ms(r['itl_ms'], 2):>8} {_ms(r['tpot_ms'], 2):>8}")
    return "\n".join(lines + [
        "server: queue = waiting for the model; prefill = from its turn to its first token;",
        "        TTFT = request received -> first token (means over these requests)",
        "client: TTFT = send -> first streamed token (mean, p95); ITL = the gap between two",
        "        streamed tokens; TPOT = (latency - TTFT) / (tokens - 1) (means)"])


def _util_note(rows: list[dict]) -> str:
    if not rows:
        return "\n(no rows)"
    if any(r.get("utilization_source") == "cpu-mode" for r in rows):
        return ("\nutil % = CPU mode: share of time the (first) server's inference worker was "
                "busy, from its /stats; no GPU here, so no SM activity")
    return "\nutil % = NVML utilization.gpu (any kernel running); SM % = NVML GPM SM activity"


def _pct(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"


def _ms(value, digits: int = 0) -> str:
    """A time in ms, "-" when there is none (None or NaN: no request gave one)."""
    return "-" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
