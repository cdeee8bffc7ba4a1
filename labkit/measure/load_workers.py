"""`labkit loadtest --workers N`: the same load test sent from N processes, one report.

One Python process reads a few tens of thousands of streamed chunks a second before its event
loop falls behind (`benchmarks/loadtest_capacity.py`); a fast server streams more. Here the
load is split: closed loop, the concurrency and the requests shared out (worker k takes
requests k, k+N, ...); open loop, one Poisson schedule drawn once, each worker sending every
N-th arrival. The workers warm up, then start together at one `time.perf_counter()` reading
(the system's monotonic clock, the same in every process), so their records share one
timeline and merge into one `LoadTestResult`. Each keeps watching its own event loop's lag;
the report says when any of them was saturated.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable

from labkit.measure.loadstats import LoadTestResult

START_MARGIN_S = 0.1  # from the last worker's "ready" to the common start


def run(workers: int, job: Callable, plan: dict, progress_bar, errors: dict[str, type]
        ) -> LoadTestResult:
    """`job(plan, ready, count) -> (records, config)` in `workers` processes, each with its share
    of `plan` (concurrency, requests, warmup, arrivals: see the module's docstring); `ready()`
    returns the common start, `count(n)` moves `progress_bar()`'s bar. A worker's exception
    comes back as the class `errors` maps its name to (else ValueError)."""
    concurrency, requests = plan["concurrency"], plan["requests"]
    if concurrency is not None and concurrency < workers:
        raise ValueError(f"--workers {workers} needs a concurrency of at least {workers}")
    if requests < workers:
        raise ValueError(f"--workers {workers} needs at least {workers} requests")
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds threads
    counter = context.Value("i", 0)
    pipes, processes = [], []
    for k in range(workers):
        arrivals = plan["arrivals"]
        share = {**plan, "requests": len(range(k, requests, workers)),
                 "concurrency": _share(concurrency, workers, k), "seed": plan["seed"] + k,
                 "warmup": _share(plan["warmup"], workers, k),
                 "arrivals": None if arrivals is None else list(arrivals[k::workers])}
        ours, theirs = context.Pipe()
        process = context.Process(target=_worker, args=(job, share, theirs, counter),
                                  name=f"labkit-loadtest-{k}", daemon=True)
        process.start()
        pipes.append(ours)
        processes.append(process)
    try:
        for pipe in pipes:
            _expect(pipe, "ready", errors)
        start_at = time.perf_counter() + START_MARGIN_S
        for pipe in pipes:
            pipe.send(start_at)
        _follow(counter, progress_bar, [p.poll for p in pipes])
        parts = [_expect(pipe, "done", errors) for pipe in pipes]
    finally:
        for process in processes:
            process.join(5)
            if process.is_alive():
                process.kill()
    return _merge(parts, workers, start_at, concurrency, plan["seed"])


def _share(total: int | None, workers: int, k: int) -> int | None:
    """Worker k's part of `total` (None stays None)."""
    return None if total is None else total // workers + (k < total % workers)


def _worker(job: Callable, plan: dict, pipe, counter) -> None:
    def count(n: int) -> None:
        with counter.get_lock():
            counter.value += n

    def ready() -> float:
        pipe.send(("ready", None))
        return pipe.recv()

    try:
        records, config = job(plan, ready, count)
    except Exception as err:  # sent to the parent, which raises it with its message
        pipe.send(("error", (type(err).__name__, str(err))))
        return
    pipe.send(("done", (records, config)))


def _expect(pipe, kind: str, errors: dict[str, type]):
    try:
        message, payload = pipe.recv()
    except EOFError:
        raise RuntimeError("a load-test worker process exited without a word (run from a "
                           "script? guard its code with `if __name__ == '__main__':`, which "
                           "spawned processes need)") from None
    if message == "error":
        name, text = payload
        raise errors.get(name, ValueError)(text)
    if message != kind:
        raise RuntimeError(f"a load-test worker said {message!r}, expected {kind!r}")
    return payload


def _follow(counter, progress_bar, polls) -> None:
    """Move the progress bar by the requests every worker has finished, until they all report."""
    with progress_bar() as bar:
        seen = 0
        while True:
            done = all(poll() for poll in polls)
            now = counter.value
            if bar is not None and now > seen:
                bar.update(now - seen)
                seen = now
            if done:
                return
            time.sleep(0.1)


def _merge(parts: list, workers: int, start_at: float, concurrency: int | None,
           seed: int) -> LoadTestResult:
    """One result: worker k's request j becomes request k + j × workers; every worker's clock
    started at `start_at`, so the records' times already share one timeline."""
    records, lags = [], []
    for k, (part_records, config) in enumerate(parts):
        for record in part_records:
            record.index = k + record.index * workers
            records.append(record)
        lags.append(config.get("client_loop_lag_ms") or [])
    records.sort(key=lambda r: r.index)
    config = dict(parts[0][1])
    config.update(concurrency=concurrency, requests=len(records), workers=workers,
                  t0_perf_counter=start_at, seed=seed,
                  client_loop_lag_ms=[x for lag in lags for x in lag],
                  client_loop_lag_ms_by_worker=[max(lag, default=0.0) for lag in lags])
    return LoadTestResult(records, config)
