"""Notebook 08 and its exercises: continuous batching against static batching, on one device.

The experiment (`start_servers`, then `run` for each): a mixed workload, mostly short requests
and some long ones (their `max_tokens`), arriving as a Poisson process (`labkit loadtest --rate R
--max-tokens S:0.8,L:0.2`) at one server, under the live timeline, which also records the
server's own /stats: requests waiting and running, and a continuous server's KV cache pages. Run
it against `labkit serve --mode batched` and then `--mode continuous` at the same offered rate;
`table` puts them side by side and `findings` says what the numbers show ("What you saw").

Static batching runs a batch until its longest request is done: a short request that arrives
meanwhile waits for all of it, and a short request inside a batch with a long one is answered
early but the batch's slot stays taken. Continuous batching re-forms the batch at every decode
step, so the short request joins at the next step. What that is worth is what the table measures:
the short requests' p95 latency above all (the issue's target: continuous ≤ 0.5× batched at the
same offered rate, `SHORT_P95_TARGET`).

The in-process side (`step_trace`, `ttft_at_rates`) drives a `ContinuousEngine` directly: one
step at a time with its stats after each, and open-loop arrivals at several rates for the
exercise on TTFT.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labkit.course import experiments
from labkit.measure import loadtest, utilization
from labkit.measure.loadstats import LoadTestResult, percentiles
from labkit.serve import client
from labkit.serve.launcher import ServerProcess

SHORT_P95_TARGET = 0.5  # continuous ÷ batched p95 latency of the short requests (the issue's)
BATCHED_MAX_WAIT_MS = experiments.SWEEP_MAX_WAIT_MS  # as in notebooks 06-07 (see there why)
PROMPT = loadtest.DEFAULT_PROMPT
SERVER_START_TIMEOUT_S = 300.0


@dataclass
class Workload:
    """`requests` requests arriving at `rate` per second (Poisson, seeded), a `long_share` of
    them asking for `long_tokens` tokens and the rest for `short_tokens`."""

    short_tokens: int
    long_tokens: int
    long_share: float
    rate: float
    requests: int
    seed: int = 0
    prompt: str = PROMPT
    temperature: float = 0.7

    @property
    def max_tokens(self) -> dict[int, float]:
        """The mix as `loadtest.run(max_tokens=...)` takes it: {length: share}."""
        return {self.short_tokens: 1 - self.long_share, self.long_tokens: self.long_share}

    @property
    def cli(self) -> str:
        """The same load from a shell."""
        return (f"labkit loadtest --url URL --rate {self.rate:g} --requests {self.requests} "
                f"--max-tokens {self.short_tokens}:{1 - self.long_share:g},"
                f"{self.long_tokens}:{self.long_share:g} --seed {self.seed}")

    def describe(self) -> str:
        return (f"{self.requests} requests, Poisson arrivals at {self.rate:g} req/s (seed "
                f"{self.seed}): {1 - self.long_share:.0%} ask for {self.short_tokens} tokens, "
                f"{self.long_share:.0%} for {self.long_tokens}")


@dataclass
class Run:
    """One server under the workload: the load test, the sampler's view of its window, the
    server's /stats counters before and after."""

    mode: str
    model: str
    device: str
    workload: Workload
    result: LoadTestResult
    frame: Any  # UtilizationSampler.frame() of the whole timeline
    utilization: dict  # UtilizationSampler.summary() over the load test's window
    before: dict  # the server's /stats "server" block before the load test
    after: dict  # ... and after it
    timeline: Any = None  # the final live-timeline Figure


def server_options(mode: str, max_batch_size: int = 32,
                   max_wait_ms: float = BATCHED_MAX_WAIT_MS,
                   kv_cache_gb: float | None = None) -> list[str]:
    """`labkit serve` flags of each mode: batched with its batch size and wait; continuous with
    its defaults (or a given KV cache size)."""
    if mode == "batched":
        return experiments.batched_flags(max_batch_size, max_wait_ms)
    if mode == "continuous":
        return [] if kv_cache_gb is None else ["--kv-cache-gb", f"{kv_cache_gb:g}"]
    raise ValueError(f"mode must be 'batched' or 'continuous', got {mode!r}")


def start_servers(model: str, modes: tuple[str, ...] = ("batched", "continuous"), *,
                  max_batch_size: int = 32, max_wait_ms: float = BATCHED_MAX_WAIT_MS,
                  kv_cache_gb: float | None = None) -> dict[str, ServerProcess]:
    """Start one `labkit serve` per mode, all loading at once in the background (`run` waits
    for each when its turn comes); `stop_servers` ends them. The load goes to one at a time:
    a server waiting for requests does no work."""
    servers = {}
    for mode in modes:
        options = server_options(mode, max_batch_size, max_wait_ms, kv_cache_gb)
        servers[mode] = ServerProcess(model, mode=mode, extra_args=options).start()
    return servers


def stop_servers(servers: dict[str, ServerProcess]) -> None:
    for server in servers.values():
        server.terminate()
    for server in servers.values():
        server.stop()


def run(server: ServerProcess, workload: Workload, *, warmup: int = 8,
        live: bool = True) -> Run:
    """Wait until `server` is ready, warm it up (`warmup` requests of the workload's lengths at
    once: on a GPU the first shapes capture their CUDA graphs), then send the workload, sampled
    every 0.1 s with the server's /stats beside the GPU's counters, under the live timeline when
    `live` (in a notebook)."""
    srv = server.wait_ready(SERVER_START_TIMEOUT_S)
    health = client.get(srv.url + "/health").body
    mode = _server_stats(srv.url)["mode"]
    if warmup:
        loadtest.run(srv.url, concurrency=warmup, requests=warmup,
                     max_tokens=workload.max_tokens, prompt=workload.prompt,
                     seed=workload.seed + 1, progress=False)
    before = _server_stats(srv.url)
    sampler = utilization.UtilizationSampler(interval=0.1, url=srv.url, server_stats=True)
    with ExitStack() as stack:
        watch, view = (lambda fn, *a, **k: fn(*a, **k)), None
        if live:
            from labkit.measure import plots  # matplotlib: only where a timeline is drawn

            view = stack.enter_context(plots.LiveTimeline(
                sampler, model=health["model"], refresh=2.0,
                title=f"{mode} server: {workload.describe()}"))
            watch = view.watch
        else:
            stack.enter_context(sampler)
        start = time.perf_counter()
        result = watch(loadtest_process, srv.url, workload)
        end = time.perf_counter()
    after = _server_stats(srv.url)  # the sampler has stopped; a live timeline drew its last
    return Run(mode, health["model"], health["gpu_name"] or "CPU", workload, result,
               sampler.frame(), sampler.summary(start=start, end=end), before, after,
               view.figure if view is not None else None)


def loadtest_process(url: str, workload: Workload, timeout: float = 900.0) -> LoadTestResult:
    """The workload sent by `labkit loadtest` in a process of its own (`workload.cli`), read
    back from its --json file. Its own process: a notebook that redraws a live timeline holds
    Python's lock for a tenth of a second per redraw, and a client sharing that process sends
    its requests late by as much."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "loadtest.json"
        mix = ",".join(f"{n}:{share:g}" for n, share in workload.max_tokens.items())
        command = [sys.executable, "-m", "labkit", "loadtest", "--url", url,
                   "--rate", f"{workload.rate:g}", "--requests", str(workload.requests),
                   "--max-tokens", mix, "--prompt", workload.prompt,
                   "--temperature", f"{workload.temperature:g}", "--seed", str(workload.seed),
                   "--json", str(path), "--no-progress"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if not path.exists():
            raise RuntimeError(f"labkit loadtest failed (exit {done.returncode}):\n"
                               f"{done.stderr[-2000:]}")
        return LoadTestResult.from_document(json.loads(path.read_text()))


def _server_stats(url: str) -> dict:
    return client.get(url + "/stats").body["server"]


# --- the side-by-side table ---------------------------------------------------------------------

def row(run: Run) -> dict:
    """One server's figures: latency and TTFT per length, throughput, utilization, and what
    its /stats showed (peak waiting and running, KV cache pages, preemptions)."""
    s = run.result.summary()
    w = run.workload
    by_length = s["by_max_tokens"] or {}
    short, long = by_length.get(w.short_tokens, {}), by_length.get(w.long_tokens, {})
    util = run.utilization
    before, after = run.before, run.after
    d_up = after["uptime_s"] - before["uptime_s"]
    queue = [r.queue_time_ms for r in run.result.ok_records
             if r.queue_time_ms is not None and r.max_tokens == w.short_tokens]
    return {
        "mode": run.mode, "model": run.model, "device": run.device,
        "requests": s["total_requests"], "successful": s["successful"],
        "offered_rate": w.rate, "requests_per_second": s["requests_per_sec"],
        "output_tokens_per_sec": s["output_tokens_per_sec"],
        "short_tokens": w.short_tokens, "long_tokens": w.long_tokens,
        "short_p50_ms": _get(short, "latency_ms", "p50"),
        "short_p95_ms": _get(short, "latency_ms", "p95"),
        "long_p50_ms": _get(long, "latency_ms", "p50"),
        "long_p95_ms": _get(long, "latency_ms", "p95"),
        "ttft_p50_ms": s["ttft_ms"]["p50"], "ttft_p95_ms": s["ttft_ms"]["p95"],
        "short_ttft_p95_ms": _get(short, "ttft_ms", "p95"),
        "short_queue_ms": float(np.mean(queue)) if queue else math.nan,
        "mean_util": util["mean_util"], "utilization_source": util["source"],
        "sm_activity_mean": util.get("sm_activity_mean"),
        "server_busy_pct": (100 * (after["busy_seconds"] - before["busy_seconds"]) / d_up
                            if d_up > 0 else None),
        "peak_waiting": util.get("queue_depth_max"), "peak_running": util.get("in_flight_max"),
        "kv_pages_used_max": util.get("kv_pages_used_max"),
        "kv_pages_total": after.get("kv_pages_total"),
        "kv_page_tokens": after.get("kv_page_tokens"),
        "preemptions": (after["preemptions"] - before.get("preemptions", 0)
                        if "preemptions" in after else None),
        "prompt_tokens": _prompt_tokens(run.result),
        "short_trend": latency_trend(run.result, w.short_tokens),
    }


def latency_trend(result: LoadTestResult, max_tokens: int) -> float:
    """Median latency of the last third of the `max_tokens` requests (in arrival order) ÷ that
    of the first third: about 1 when the server kept up with the arrivals, growing when its
    queue grew through the run. NaN with fewer than 3 such requests."""
    latencies = [r.latency_ms for r in result.ok_records if r.max_tokens == max_tokens]
    third = len(latencies) // 3
    if third == 0:
        return math.nan
    return float(np.median(latencies[-third:]) / np.median(latencies[:third]))


def _get(entry: dict, what: str, q: str) -> float:
    return entry.get(what, {}).get(q, math.nan)


def _prompt_tokens(result: LoadTestResult) -> int | None:
    counts = [r.prompt_tokens for r in result.ok_records if r.prompt_tokens is not None]
    return max(counts) if counts else None


def table(rows: list[dict]) -> str:
    """The servers side by side, one column each, one line per figure."""
    cpu = any(r["utilization_source"] == "cpu-mode" for r in rows)
    first = rows[0]
    lines_spec = [
        ("requests ok", lambda r: f"{r['successful']}/{r['requests']}"),
        (f"short ({first['short_tokens']} tok) p50 ms", lambda r: _f(r["short_p50_ms"])),
        (f"short ({first['short_tokens']} tok) p95 ms", lambda r: _f(r["short_p95_ms"])),
        (f"long ({first['long_tokens']} tok) p50 ms", lambda r: _f(r["long_p50_ms"])),
        (f"long ({first['long_tokens']} tok) p95 ms", lambda r: _f(r["long_p95_ms"])),
        ("TTFT p50 ms (all)", lambda r: _f(r["ttft_p50_ms"])),
        ("TTFT p95 ms (all)", lambda r: _f(r["ttft_p95_ms"])),
        ("short: mean queue ms", lambda r: _f(r["short_queue_ms"])),
        ("output tok/s", lambda r: _f(r["output_tokens_per_sec"], 1)),
        (f"req/s (offered {first['offered_rate']:g})", lambda r: _f(r["requests_per_second"], 2)),
        ("busy % (CPU mode)" if cpu else "GPU util % (NVML)", lambda r: _f(r["mean_util"], 1)),
        ("SM activity % (GPM)", lambda r: _f(r["sm_activity_mean"], 1)),
        ("waiting in server, peak", lambda r: _f(r["peak_waiting"])),
        ("running, peak", lambda r: _f(r["peak_running"])),
        ("KV pages in use, peak", lambda r: _kv(r)),
        ("preemptions", lambda r: _f(r["preemptions"])),
    ]
    if cpu:
        lines_spec.pop(11)  # no SM activity without a GPU
    width = max(len(name) for name, _ in lines_spec) + 2
    lines = [" " * width + "".join(f"{r['mode']:>14}" for r in rows)]
    for name, cell in lines_spec:
        lines.append(f"{name:<{width}}" + "".join(f"{cell(r):>14}" for r in rows))
    lines += [
        "latency: client side, from each request's scheduled arrival to its whole answer; "
        "TTFT derived from",
        "the server's fields (latency - the generation after the first token); queue: in the "
        "server, before",
        "its generation (batched: its batch) started; waiting/running/KV: the server's /stats "
        "every 0.1 s",
        ("busy % = CPU mode: share of time the server was generating, not GPU utilization"
         if cpu else "GPU util % = NVML utilization.gpu (any kernel running); SM activity = "
                     "NVML GPM"),
    ]
    return "\n".join(lines)


def _kv(r: dict) -> str:
    if r["kv_pages_used_max"] is None or r["kv_pages_total"] is None:
        return "-"
    return f"{r['kv_pages_used_max']:.0f}/{r['kv_pages_total']:.0f}"


def _f(value, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


# --- what you saw -------------------------------------------------------------------------------

def findings(batched: dict, continuous: dict) -> str:
    """Notebook 08's conclusions from the two servers' rows (`row`), both sides of every verdict
    computed, never assumed."""
    b, c = batched, continuous
    lines = []
    ratio = c["short_p95_ms"] / b["short_p95_ms"]
    lines.append(
        f"Short requests ({b['short_tokens']} tokens), p95 latency at {b['offered_rate']:g} "
        f"req/s offered: {b['short_p95_ms']:,.0f} ms batched vs {c['short_p95_ms']:,.0f} ms "
        f"continuous, {ratio:.2f}x (target ≤ {SHORT_P95_TARGET:g}x: "
        + ("met)." if ratio <= SHORT_P95_TARGET else f"NOT met). {_not_met()}"))
    long_ratio = c["long_p95_ms"] / b["long_p95_ms"]
    lines.append(
        f"Long requests ({b['long_tokens']} tokens), p95: {b['long_p95_ms']:,.0f} ms batched vs "
        f"{c['long_p95_ms']:,.0f} ms continuous ({long_ratio:.2f}x, under 1x is faster): "
        + ("they gained too." if long_ratio < 1 else
           "continuous batching did not make them faster here. A long request shares every "
           "step with whatever else runs, so its own decode slows as more run at once: a "
           "little on a GPU, where a step costs about the same for more rows, and much more on "
           "a CPU, where each row adds its own compute."))
    lines.append(
        f"A short request waited in the server {b['short_queue_ms']:,.0f} ms on average before "
        f"its batch started, against {c['short_queue_ms']:,.0f} ms before the continuous server "
        f"began its prefill; p95 TTFT {b['ttft_p95_ms']:,.0f} vs {c['ttft_p95_ms']:,.0f} ms.")
    if b["peak_waiting"] is not None and c["peak_waiting"] is not None:
        lines.append(
            f"The batched server's /stats showed up to {b['peak_waiting']:.0f} requests waiting "
            f"behind a running batch of up to {b['peak_running']:.0f}; the continuous one up to "
            f"{c['peak_waiting']:.0f} waiting, with up to {c['peak_running']:.0f} running at "
            "once.")
    lines.append(_throughput(b, c))
    if c["kv_pages_used_max"] is not None and c["kv_pages_total"]:
        share = c["kv_pages_used_max"] / c["kv_pages_total"]
        text = (f"The continuous server's KV cache: at most {c['kv_pages_used_max']:.0f} of "
                f"{c['kv_pages_total']:.0f} pages in use ({share:.1%})")
        if c.get("kv_page_tokens") and c.get("prompt_tokens"):
            per_long = math.ceil((c["prompt_tokens"] + c["long_tokens"]) / c["kv_page_tokens"])
            text += (f"; a long request needs up to {per_long} pages of {c['kv_page_tokens']} "
                     f"tokens, so it held room for {c['kv_pages_total'] // per_long:,.0f} of "
                     "them at once")
        lines.append(text + _preemptions(c.get("preemptions")))
    lines.append(_utilization(b, c))
    return "\n".join(f"- {line}" for line in lines)


def _not_met() -> str:
    """Why continuous batching can fail to halve the short requests' p95."""
    return ("Continuous batching did not halve the short requests' p95 here: either the "
            "batched server seldom made them wait behind a long batch (compare the mean queue "
            "below), or the continuous server's steps slowed as more requests ran at once, as "
            "they do on a CPU, where each running request adds its own compute to every step (a "
            "GPU's step costs about the same for more of them).")


def _preemptions(preempted: float | None) -> str:
    if preempted is None:
        return "."
    if not preempted:
        return "; no preemption: the running requests never needed more pages than it had."
    return (f"; {preempted:.0f} preemption{'s' if preempted != 1 else ''}: the running requests "
            "outgrew it, and each preempted one gave its pages back to be prefilled again "
            "later.")


KEPT_UP_TREND = 2.0  # later short requests over twice as slow as the first: the queue grew


def _throughput(b: dict, c: dict) -> str:
    parts = []
    for r in (b, c):
        trend = r.get("short_trend", math.nan)
        verdict = "" if math.isnan(trend) else f", {_trend(trend)}"
        parts.append(f"{r['mode']} {r['requests_per_second']:.2f} req/s and "
                     f"{r['output_tokens_per_sec']:,.0f} output tok/s{verdict}")
    return (f"Served at {b['offered_rate']:g} req/s offered (an open-loop test's req/s also "
            "counts the last requests' own time): " + "; ".join(parts) + ".")


def _trend(trend: float) -> str:
    """The last third of the short requests' median latency against the first third's."""
    change = (f"its last short requests took {trend:.1f}x as long as its first" if trend >= 1
              else f"its last short requests were {1 / trend:.1f}x faster than its first")
    if trend < KEPT_UP_TREND:
        return change + " (under " f"{KEPT_UP_TREND:g}x): it kept up"
    return (change + f" (over {KEPT_UP_TREND:g}x): it fell behind, its queue grew (the "
            "arrivals outpaced what it served; that happens on any device, a CPU only at a "
            "lower rate)")


def _utilization(b: dict, c: dict) -> str:
    if b["utilization_source"] == "cpu-mode":
        return (f"Server busy share (CPU mode, not GPU utilization): {_f(b['mean_util'], 1)} % "
                f"batched vs {_f(c['mean_util'], 1)} % continuous, the share of time each had a "
                "generation running; without a GPU there is no SM activity to read.")
    text = (f"Mean NVML utilization {_f(b['mean_util'], 1)} % batched vs "
            f"{_f(c['mean_util'], 1)} % continuous")
    if b.get("sm_activity_mean") is not None and c.get("sm_activity_mean") is not None:
        text += (f"; SM activity {b['sm_activity_mean']:.1f} % vs {c['sm_activity_mean']:.1f} %"
                 " (how much of the chip the busy time used)")
    return text + "."


# --- in process: one engine, step by step -------------------------------------------------------

def mixed_requests(count: int, short_tokens: int, long_tokens: int, long_share: float,
                   seed: int = 0, prompt: str = PROMPT, temperature: float = 0.7) -> list:
    """`count` Requests of the mixed workload's lengths, in the order `loadtest` would draw."""
    from labkit.engine.request import Request

    mix = {short_tokens: 1 - long_share, long_tokens: long_share}
    lengths = loadtest.assign_max_tokens(mix, count, np.random.default_rng([seed, 1]))
    return [Request(prompt, n, temperature, seed=seed + i, ignore_eos=True)
            for i, n in enumerate(lengths)]


def step_trace(engine, requests: list) -> tuple[list[dict], list]:
    """Add every request to `engine` at once, then step it until all are done. Returns one row
    per step (requests running and waiting after it, KV cache pages in use, tokens decoded in
    it, requests finished so far) and the results in request order."""
    results: dict[int, Any] = {}
    for index, request in enumerate(requests):
        engine.add(request, lambda result, index=index: results.__setitem__(index, result))
    rows, step, started = [], 0, time.perf_counter()
    while engine.has_work():
        decoded = engine.decode_tokens
        engine.step()
        step += 1
        stats = engine.stats()
        rows.append({"step": step, "ms": (time.perf_counter() - started) * 1000,
                     "running": stats["running"], "waiting": stats["waiting"],
                     "kv_pages_used": stats["kv_pages_used"],
                     "kv_pages_total": stats["kv_pages_total"],
                     "decoded": engine.decode_tokens - decoded, "finished": len(results),
                     "preemptions": stats["preemptions"]})
    return rows, [results[i] for i in range(len(requests))]


def trace_table(rows: list[dict], lines: int = 14) -> str:
    """About `lines` steps of a `step_trace`: the first ones, then evenly spaced, the last."""
    picked = sorted(set(range(min(4, len(rows))))
                    | {round(i) for i in np.linspace(0, len(rows) - 1, max(2, lines - 4))})
    out = [f"{'step':>5} {'ms':>8} {'running':>8} {'waiting':>8} {'KV pages':>10} "
           f"{'decoded':>8} {'finished':>9}"]
    for i in picked:
        r = rows[i]
        out.append(f"{r['step']:>5} {r['ms']:>8.1f} {r['running']:>8} {r['waiting']:>8} "
                   f"{r['kv_pages_used']:>5}/{r['kv_pages_total']:<4} {r['decoded']:>8} "
                   f"{r['finished']:>9}")
    out.append("running/waiting/KV pages: after the step; decoded: tokens generated in it (one "
               "per running request that has its first token)")
    out.append("KV pages: in use / usable; the cache has one page more, page 0, which belongs to "
               "no request: padded rows write there")
    return "\n".join(out)


def trace_findings(rows: list[dict], results: list, max_running: int) -> str:
    """What a `step_trace` shows: who waited, when they joined, where the pages went."""
    first = rows[0]
    lines = [f"{len(results)} requests added at once: after step 1, {first['running']} ran "
             f"(max_running {max_running}) and {first['waiting']} waited."]
    joined = next((r["step"] for prev, r in zip(rows, rows[1:], strict=False)
                   if r["waiting"] < prev["waiting"]), None)
    finished = next(r["step"] for r in rows if r["finished"])
    if first["waiting"] and joined is not None:
        lines.append(f"The first request finished at step {finished} and the first waiting one "
                     f"joined at step {joined}; the last finished at step {rows[-1]['step']}. A "
                     "static batch would have kept the waiting ones out until its longest "
                     "request was done.")
    elif not first["waiting"]:
        lines.append("Nothing waited: max_running and the KV cache held every request at once.")
    peak, total = max(r["kv_pages_used"] for r in rows), first["kv_pages_total"]
    lines.append(f"KV pages in use peaked at {peak} of {total} and were back to "
                 f"{rows[-1]['kv_pages_used']} after the last request.")
    preempted = rows[-1]["preemptions"]
    finished = sum(1 for r in results if r is not None)
    lines.append(
        f"{preempted} preemption{'s' if preempted != 1 else ''}: running requests outgrew the "
        "cache, so the most recently admitted one gave its pages back and went to the front of "
        f"the queue, to be prefilled again later; all {finished} requests still finished."
        if preempted else
        "No preemption: the running requests never needed more pages than the cache had (a "
        "smaller DEMO_PAGES makes them run out).")
    return "\n".join(f"- {line}" for line in lines)


# --- in process: TTFT against the arrival rate (exercise 08) ------------------------------------

def ttft_at_rates(engine, rates: list[float], requests: int, max_tokens, *, seed: int = 0,
                  prompt: str = PROMPT, temperature: float = 0.7,
                  warmup: int = 4) -> list[dict]:
    """For each rate: `requests` requests arriving at `rate` per second (Poisson, seeded), their
    lengths from `max_tokens` (one length or a mix, as `loadtest.run` takes it), added to
    `engine` when due while this thread steps it (each asks for exactly its length:
    ignore_eos). TTFT counts from each request's scheduled
    arrival (a step that ran past it delays the request, and that counts): lateness + queue in
    the engine + prefill to the first token. `warmup` requests run first, not measured (on a GPU
    the first shapes capture their CUDA graphs)."""
    from labkit.engine.request import Request

    mix = loadtest.parse_max_tokens(max_tokens)
    if warmup:
        lengths = loadtest.assign_max_tokens(mix, warmup, np.random.default_rng([seed, 2]))
        engine.generate([Request(prompt, n, temperature, ignore_eos=True) for n in lengths])
    rows = []
    for rate in rates:
        gaps = np.random.default_rng(seed).exponential(1 / rate, requests)
        arrivals = np.cumsum(gaps) - gaps[0]
        lengths = loadtest.assign_max_tokens(mix, requests, np.random.default_rng([seed, 1]))
        results: dict[int, Any] = {}
        done = results.__setitem__
        late, waiting, i = {}, 0, 0
        t0 = time.perf_counter()
        while i < requests or engine.has_work():
            now = time.perf_counter() - t0
            while i < requests and arrivals[i] <= now:
                engine.add(Request(prompt, lengths[i], temperature, seed=seed + i,
                                   ignore_eos=True),
                           lambda result, i=i, done=done: done(i, result))
                late[i] = now - arrivals[i]
                i += 1
            if engine.has_work():
                engine.step()
                waiting = max(waiting, engine.stats()["waiting"])
            elif i < requests:
                time.sleep(max(0.0, arrivals[i] - (time.perf_counter() - t0)))
        wall = time.perf_counter() - t0
        ttft = [1000 * late[k] + r.queue_time_ms + r.time_to_first_token_ms
                for k, r in results.items()]
        latency = [1000 * late[k] + r.queue_time_ms + r.inference_time_ms
                   for k, r in results.items()]
        rows.append({"rate": rate, "requests": requests,
                     "ttft_p50_ms": percentiles(ttft, (50,))["p50"],
                     "ttft_p95_ms": percentiles(ttft, (95,))["p95"],
                     "latency_p95_ms": percentiles(latency, (95,))["p95"],
                     "requests_per_second": requests / wall, "peak_waiting": waiting})
    return rows


def rates_table(rows: list[dict]) -> str:
    lines = [f"{'rate req/s':>10} {'TTFT p50 ms':>12} {'TTFT p95 ms':>12} {'p95 ms':>9} "
             f"{'served req/s':>13} {'peak waiting':>13}"]
    for r in rows:
        lines.append(f"{r['rate']:>10g} {r['ttft_p50_ms']:>12.1f} {r['ttft_p95_ms']:>12.1f} "
                     f"{r['latency_p95_ms']:>9.0f} {r['requests_per_second']:>13.2f} "
                     f"{r['peak_waiting']:>13}")
    return "\n".join(lines)
