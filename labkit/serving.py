"""Serving modes: how queued /generate requests reach the model, and the server's own clock of
busy time. Independent of HTTP: `labkit.server` submits requests and awaits outcomes.

`SequentialScheduler` is the seed's baseline: one generation at a time, the others wait in FIFO
order. A batched scheduler (issue 6) implements the same `Scheduler` interface.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from labkit.backend import Backend, GenerationRequest

log = logging.getLogger("labkit.server")

RECENT_WINDOW_S = 5.0


class BusyClock:
    """Wall time during which a generation was running: the server's own view of idle time,
    which needs no GPU. busy_fraction = busy time ÷ wall time, since start or over the last
    `window_s` seconds. Thread-safe: intervals open and close on the generation thread."""

    def __init__(self, window_s: float = RECENT_WINDOW_S, clock=time.perf_counter):
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started_at = clock()
        self._closed_total = 0.0
        self._running_since: float | None = None
        self._recent: collections.deque[tuple[float, float]] = collections.deque()

    def start(self) -> None:
        with self._lock:
            self._running_since = self._clock()

    def stop(self) -> None:
        with self._lock:
            if self._running_since is None:
                return
            end = self._clock()
            self._closed_total += end - self._running_since
            self._recent.append((self._running_since, end))
            self._running_since = None
            self._prune(end)

    def uptime_s(self) -> float:
        return self._clock() - self._started_at

    def busy_seconds(self) -> float:
        with self._lock:
            now = self._clock()
            running = now - self._running_since if self._running_since is not None else 0.0
            return self._closed_total + running

    def busy_fraction(self) -> float:
        uptime = self.uptime_s()
        return min(1.0, self.busy_seconds() / uptime) if uptime > 0 else 0.0

    def busy_fraction_recent(self) -> float:
        """Share of the last `window_s` seconds (or of the uptime, if shorter) spent generating."""
        with self._lock:
            now = self._clock()
            start = max(now - self.window_s, self._started_at)
            span = now - start
            if span <= 0:
                return 0.0
            self._prune(now)
            busy = sum(min(e, now) - max(s, start) for s, e in self._recent if e > start)
            if self._running_since is not None:
                busy += now - max(self._running_since, start)
            return min(1.0, busy / span)

    def _prune(self, now: float) -> None:
        while self._recent and self._recent[0][1] < now - self.window_s:
            self._recent.popleft()


class OutOfMemory(Exception):
    """The device ran out of memory during one request; the cache was freed."""


@dataclass
class JobOutcome:
    """What happened to one submitted request. Exactly one of result / error is set."""

    result: object | None  # engine.GenerationResult
    error: BaseException | None
    queue_time_ms: float  # submitted -> generation started
    memory_used_gb: float | None = None


@dataclass(eq=False)  # hashed by identity: jobs live in a set while they wait
class _Job:
    request: GenerationRequest
    submitted: float
    future: asyncio.Future = field(repr=False)


class Scheduler(Protocol):
    mode: str

    def set_backend(self, backend: Backend) -> None: ...
    async def start(self) -> None: ...
    async def submit(self, request: GenerationRequest) -> JobOutcome: ...
    async def wait_idle(self, timeout: float | None = None) -> bool: ...
    async def close(self) -> None: ...
    def stats(self) -> dict: ...


class SequentialScheduler:
    """Exactly one generation at a time, FIFO. Generation runs on one dedicated thread, so the
    event loop keeps answering /, /health and /stats while the model works.

    A request whose client goes away while it waits is dropped before it starts; one that is
    already generating runs to the end (HF `generate` cannot be interrupted safely) and its
    result is discarded. Either way the worker moves on to the next job: nothing wedges."""

    mode = "sequential"

    def __init__(self, backend: Backend | None = None, window_s: float = RECENT_WINDOW_S):
        self.backend = backend
        self.busy = BusyClock(window_s)
        self.served = 0  # generations that finished and returned a result
        self.failed = 0  # generations that raised (out of memory, or a bug)
        self.cancelled = 0  # client disconnected before its result was delivered
        self._queue: asyncio.Queue[_Job] | None = None
        self._waiting: set[_Job] = set()
        self._in_flight = 0
        self._idle: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "labkit-generate")

    def set_backend(self, backend: Backend) -> None:
        self.backend = backend

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = asyncio.create_task(self._run_worker(), name="labkit-scheduler")

    async def submit(self, request: GenerationRequest) -> JobOutcome:
        """Queue `request` and wait for its outcome. Cancelling the caller (a client that
        disconnects) withdraws the job if it has not started yet."""
        if self.backend is None or self._queue is None:
            raise RuntimeError("scheduler has no model yet")
        job = _Job(request, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._waiting.add(job)
        self._idle.clear()
        self._queue.put_nowait(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            if job in self._waiting:  # never started: the worker will skip it
                self._waiting.discard(job)
            self.cancelled += 1
            self._update_idle()
            raise

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until nothing is queued or running; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        # A generation still running (forced stop) is abandoned, not joined.
        self._executor.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict:
        uptime = self.busy.uptime_s()
        return {
            "mode": self.mode,
            "uptime_s": round(uptime, 3),
            "requests_served": self.served,
            "requests_failed": self.failed,
            "requests_cancelled": self.cancelled,
            "queue_depth": len(self._waiting),
            "in_flight": self._in_flight,
            "busy_seconds": round(self.busy.busy_seconds(), 4),
            "busy_fraction": round(self.busy.busy_fraction(), 4),
            "busy_fraction_recent": round(self.busy.busy_fraction_recent(), 4),
            "recent_window_s": self.busy.window_s,
        }

    async def _run_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job not in self._waiting:  # withdrawn while queued
                self._update_idle()
                continue
            self._waiting.discard(job)
            self._in_flight = 1
            try:
                outcome = await loop.run_in_executor(self._executor, self._generate, job)
            finally:
                self._in_flight = 0
            if outcome.error is None:
                self.served += 1
            else:
                self.failed += 1
            if not job.future.done():
                job.future.set_result(outcome)
            self._update_idle()

    def _generate(self, job: _Job) -> JobOutcome:
        """Runs on the generation thread: time the wait, generate, catch what a request can
        cause without taking the server down."""
        import torch

        queue_ms = (time.perf_counter() - job.submitted) * 1000
        self.busy.start()
        try:
            result = self.backend.generate(job.request)
            return JobOutcome(result, None, queue_ms, self.backend.memory_used_gb())
        except (torch.OutOfMemoryError, MemoryError) as err:
            return self._out_of_memory(err, queue_ms)
        except RuntimeError as err:
            if "can't allocate memory" in str(err):  # torch's CPU allocator says it this way
                return self._out_of_memory(err, queue_ms)
            return JobOutcome(None, err, queue_ms)
        except Exception as err:  # reported to the client; the worker must survive it
            return JobOutcome(None, err, queue_ms)
        finally:
            self.busy.stop()

    def _out_of_memory(self, err: BaseException, queue_ms: float) -> JobOutcome:
        # Free what the failed request left in the allocator's cache, so the next request
        # starts from the same memory as before instead of failing too.
        self.backend.free_memory()
        log.warning("Out of memory during a request (cache freed, still serving): %s", err)
        return JobOutcome(None, OutOfMemory(str(err) or type(err).__name__), queue_ms)

    def _update_idle(self) -> None:
        if not self._waiting and not self._in_flight:
            self._idle.set()


SCHEDULERS: dict[str, type] = {"sequential": SequentialScheduler}


def make_scheduler(mode: str = "sequential", **kwargs) -> Scheduler:
    if mode not in SCHEDULERS:
        raise ValueError(f"unknown serving mode {mode!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[mode](**kwargs)
