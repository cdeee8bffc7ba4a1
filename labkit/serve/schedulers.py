"""Serving modes: how queued /generate requests reach the model, and the server's own clock of
busy time. Independent of HTTP: `labkit.serve.http` submits requests and awaits outcomes.

`SequentialScheduler` is the seed's baseline: one generation at a time, the others wait in FIFO
order. `BatchedScheduler` generates the requests that queued up while the model was busy
together, as one batch. `ContinuousScheduler` feeds a continuous-batching engine, whose batch
changes at every decode step. All share `QueueScheduler`'s clock, counters and fault handling.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from labkit.engine.request import EngineGone, OutOfMemory, Request, Result
from labkit.serve.relay import Relay

if TYPE_CHECKING:
    from labkit.serve.backend import Backend, EngineBackend

log = logging.getLogger(__name__)

RECENT_WINDOW_S = 5.0
DEFAULT_MAX_BATCH_SIZE = 32
# Continuous mode: most requests decoding at once (the engine's default; not imported from
# labkit.engine.continuous, which imports torch).
DEFAULT_MAX_RUNNING = 256
DEFAULT_MAX_WAIT_MS = 5.0
# Continuous mode: an engine step running longer than this is taken for a wedged engine. A step
# is milliseconds on a GPU; a graph capture or a long CPU prefill, seconds.
DEFAULT_STEP_TIMEOUT_S = 120.0
MAX_WAIT_LIMIT_MS = 10_000.0


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

    def start(self, at: float | None = None) -> None:
        """A generation runs from now (or from `at`, a reading of the same clock)."""
        with self._lock:
            if self._running_since is None:
                self._running_since = self._clock() if at is None else at

    def stop(self, at: float | None = None) -> None:
        with self._lock:
            if self._running_since is None:
                return
            end = self._clock() if at is None else at
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


@dataclass(eq=False)  # hashed by identity: jobs live in a set while they wait
class _Job:
    request: Request
    submitted: float
    future: asyncio.Future = field(repr=False)  # its Result, or the error that stopped it
    outcome: str | None = None  # served, failed or cancelled: counted once, when first known


class Scheduler(Protocol):
    mode: str
    served: int
    relay: Relay  # hands results (and streamed text) from the generation threads to the loop

    def set_backend(self, backend: Backend) -> None: ...
    def run_on_generation_thread(self, fn: Callable[[], object]) -> object: ...
    async def start(self) -> None: ...
    async def submit(self, request: Request) -> Result: ...
    async def wait_idle(self, timeout: float | None = None) -> bool: ...
    async def close(self) -> None: ...
    def stats(self) -> dict: ...
    def failure(self) -> str | None: ...
    def abandon(self, reason: str) -> None: ...


class QueueScheduler:
    """A FIFO queue in front of one generation thread, which takes up to `max_batch_size` jobs
    at a time. Subclasses say how a group of jobs is generated (`_generate_group`).

    Generation runs on one dedicated thread, so the event loop keeps answering /, /health and
    /stats while the model works. A request whose client goes away while it waits is dropped
    before it starts; one that is already generating is marked cancelled, and the engine stops
    it at its next decode step (a batch goes on without it) and its result is discarded. Either
    way the worker moves on: nothing wedges. Out of memory frees the allocator's cache and fails
    only the requests it hit."""

    mode = "queue"

    def __init__(self, backend: Backend | None = None, window_s: float = RECENT_WINDOW_S, *,
                 max_batch_size: int = 1, max_wait_ms: float = 0.0):
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.busy = BusyClock(window_s)
        self.served = 0  # requests whose generation finished and returned a result
        self.failed = 0  # requests whose generation raised (out of memory, or a bug)
        self.cancelled = 0  # client disconnected before its result was delivered
        self.batches = 0  # generations started (a group of 1 in sequential mode)
        self.batched_requests = 0  # requests in those generations
        self._queue: asyncio.Queue[_Job] | None = None
        self._waiting: set[_Job] = set()
        self._in_flight = 0  # requests generating now, not yet answered
        self._idle: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, "labkit-generate")

    def set_backend(self, backend: Backend) -> None:
        self.backend = backend

    def run_on_generation_thread(self, fn: Callable[[], object]) -> object:
        """Run `fn` on the thread that generates, and wait for it (the warm-up at load time:
        a thread's first generation pays costs that a warm-up elsewhere does not remove)."""
        return self._executor.submit(fn).result()

    async def start(self) -> None:
        self.relay = Relay(asyncio.get_running_loop())  # results and streamed text, to the loop
        self._queue = asyncio.Queue()
        self._idle = asyncio.Event()
        self._idle.set()
        self._worker = asyncio.create_task(self._run_worker(), name="labkit-scheduler")

    async def submit(self, request: Request) -> Result:
        """Queue `request` and wait for its result, with `queue_time_ms` and `memory_used_gb`
        filled in; raises what stopped it (OutOfMemory, EngineGone, or a bug). Cancelling the
        caller (a client that disconnects) withdraws the job if it has not started yet. Every
        call ends in exactly one of the counters served, failed and cancelled."""
        if self.backend is None or self._queue is None:
            raise RuntimeError("scheduler has no model yet")
        job = _Job(request, time.perf_counter(), asyncio.get_running_loop().create_future())
        self._idle.clear()
        try:
            self._enqueue(job)
        except BaseException:  # refused on the way in (the engine is gone): nothing waits
            self._count(job, "failed")
            self._update_idle()
            raise
        try:
            return await job.future
        except asyncio.CancelledError:
            request.cancelled.set()  # generating: the engine stops it at its next step
            if job in self._waiting:  # never started: the worker will skip it
                self._waiting.discard(job)
            self._count(job, "cancelled")
            self._update_idle()
            raise

    def _count(self, job: _Job, outcome: str) -> None:
        """Count `job`'s outcome, unless it has one already (a client that went away while its
        result was on the way is cancelled, not also served)."""
        if job.outcome is None:
            job.outcome = outcome
            setattr(self, outcome, getattr(self, outcome) + 1)

    def _enqueue(self, job: _Job) -> None:
        self._waiting.add(job)
        self._queue.put_nowait(job)

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

    def held(self) -> int:
        """Requests this server holds, waiting or generating, not yet answered (with several
        API servers, the engine's counts in `stats` are every server's)."""
        return len(self._waiting) + self._in_flight

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
            "batches": self.batches,
            "mean_batch_size": (round(self.batched_requests / self.batches, 3)
                                if self.batches else None),
            "max_batch_size": self.max_batch_size,
            "max_wait_ms": self.max_wait_ms,
            "busy_seconds": round(self.busy.busy_seconds(), 4),
            "busy_fraction": round(self.busy.busy_fraction(), 4),
            "busy_fraction_recent": round(self.busy.busy_fraction_recent(), 4),
            "recent_window_s": self.busy.window_s,
        }

    async def _run_worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._next_group()
            if not jobs:  # all withdrawn while queued
                self._update_idle()
                continue
            self._waiting.difference_update(jobs)
            self._in_flight = len(jobs)
            self.batches += 1
            self.batched_requests += len(jobs)
            try:
                await loop.run_in_executor(self._executor, self._generate, jobs)
            finally:  # every answer was scheduled before the executor's own completion
                self._in_flight = 0
            self._update_idle()

    async def _next_group(self) -> list[_Job]:
        """The oldest waiting job, then whatever else is queued, up to `max_batch_size` jobs;
        while the group is short, wait for more until `max_wait_ms` after the first job was
        submitted. Jobs withdrawn by their clients are skipped ([] if the first one was)."""
        first = await self._queue.get()
        if first not in self._waiting:
            return []
        group = [first]
        deadline = first.submitted + self.max_wait_ms / 1000
        while len(group) < self.max_batch_size:
            if self._queue.empty():
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if job in self._waiting:
                group.append(job)
        return [job for job in group if job in self._waiting]  # some may leave meanwhile

    def _answer(self, job: _Job, result: Result | None, error: BaseException | None) -> None:
        """On the event loop: count the outcome and hand it to the waiting handler (if it still
        waits). The one hand-off from the generation thread to the handler."""
        self._count(job, "served" if error is None else "failed")
        self._in_flight = max(0, self._in_flight - 1)
        if not job.future.done():
            if error is None:
                job.future.set_result(result)
            else:
                job.future.set_exception(error)

    def _generate(self, jobs: list[_Job]) -> None:
        """Runs on the generation thread: time each job's wait, generate the group, answer each
        job as soon as its result exists, and turn what a request can cause (out of memory, a
        bug) into the error of every job not answered yet."""
        import torch

        started = time.perf_counter()
        answered: set[int] = set()

        def finish(index: int, result: Result) -> None:
            answered.add(index)
            result.queue_time_ms = (started - jobs[index].submitted) * 1000
            result.memory_used_gb = self.backend.memory_used_gb()
            self.relay.post(self._answer, jobs[index], result, None)

        self.busy.start()
        try:
            self._generate_group([job.request for job in jobs], finish)
            return
        except (torch.OutOfMemoryError, MemoryError) as err:
            error = self._out_of_memory(err, len(jobs))
        except RuntimeError as err:
            # torch's CPU allocator says it this way
            oom = "can't allocate memory" in str(err)
            error = self._out_of_memory(err, len(jobs)) if oom else err
        except Exception as err:  # reported to the clients; the worker must survive it
            error = err
        finally:
            self.busy.stop()
        for index, job in enumerate(jobs):
            if index not in answered:
                self.relay.post(self._answer, job, None, error)

    def _generate_group(self, requests: list[Request],
                        finish: Callable[[int, Result], None]) -> None:
        """Generate `requests`, calling finish(index, result) for each as it finishes."""
        raise NotImplementedError

    def _out_of_memory(self, err: BaseException, group_size: int) -> OutOfMemory:
        return out_of_memory(self.backend, err, group_size)

    def _update_idle(self) -> None:
        if not self._waiting and not self._in_flight:
            self._idle.set()

    def failure(self) -> str | None:
        """Why this server can no longer generate (a dead or wedged engine); None while it can.
        A generation here runs in the server's own process: it fails requests, not itself."""
        return None

    def abandon(self, reason: str) -> None:
        """After `failure()`: fail every request still waiting (nothing here can fail that way)."""


def out_of_memory(backend: Backend, err: BaseException, group_size: int) -> OutOfMemory:
    """The error for the `group_size` requests an out-of-memory error failed, once the
    backend's cache is freed (so the next generation starts from the same memory as before
    instead of failing too)."""
    backend.free_memory()
    log.warning("Out of memory during a generation of %d request(s) (cache freed, still "
                "serving): %s", group_size, err)
    message = str(err) or type(err).__name__
    if group_size > 1:
        message += (f"; in a batch of {group_size} requests, which all failed: a smaller "
                    "--max-batch-size needs less memory")
    return OutOfMemory(message)


class SequentialScheduler(QueueScheduler):
    """The seed's baseline: exactly one generation at a time (Hugging Face `generate`), FIFO."""

    mode = "sequential"

    def __init__(self, backend: Backend | None = None, window_s: float = RECENT_WINDOW_S):
        super().__init__(backend, window_s, max_batch_size=1, max_wait_ms=0.0)

    def _generate_group(self, requests: list[Request],
                        finish: Callable[[int, Result], None]) -> None:
        [request] = requests
        finish(0, self.backend.generate(request))


def check_max_batch_size(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"the most requests in one batch must be a whole number, at least 1; "
                         f"got {value!r}")


def check_max_wait_ms(value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 <= value <= MAX_WAIT_LIMIT_MS:
        raise ValueError(f"the wait for a batch to fill must be from 0 to {MAX_WAIT_LIMIT_MS:g} "
                         f"ms; got {value!r}")


class BatchedScheduler(QueueScheduler):
    """Requests that arrive while the model is busy are generated together, in one batch of up
    to `max_batch_size` (`labkit.engine.batched.generate_batch`: each keeps its own max_tokens,
    temperature, top_p and seed). When the model frees up, the oldest waiting request starts a
    batch with everything queued behind it; if that is short of `max_batch_size`, the batch
    waits for more until `max_wait_ms` after that request arrived, and no longer.

    Static batching: a batch runs until its last row finishes, and requests arriving meanwhile
    wait for the next batch. Rows that finish early leave the batch and are answered at once.
    `queue_time_ms` is submit -> its batch started (the wait to fill a batch included)."""

    mode = "batched"

    def __init__(self, backend: Backend | None = None, window_s: float = RECENT_WINDOW_S, *,
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
                 max_wait_ms: float = DEFAULT_MAX_WAIT_MS):
        check_max_batch_size(max_batch_size)
        check_max_wait_ms(max_wait_ms)
        super().__init__(backend, window_s, max_batch_size=max_batch_size,
                         max_wait_ms=max_wait_ms)

    def _generate_group(self, requests: list[Request],
                        finish: Callable[[int, Result], None]) -> None:
        self.backend.generate_batch(requests, finish)


def make_scheduler(mode: str = "sequential", **kwargs) -> Scheduler:
    if mode not in SCHEDULERS:
        raise ValueError(f"unknown serving mode {mode!r}; choose one of {', '.join(SCHEDULERS)}")
    return SCHEDULERS[mode](**kwargs)


class ContinuousScheduler(QueueScheduler):
    """Continuous batching (`labkit.engine.continuous`): requests join the running batch at
    the next decode step and leave it the step they finish; up to `max_batch_size` run at once,
    as many as the KV cache has pages for.

    The engine runs in a process of its own (`labkit.serve.engine_process`, what `labkit serve`
    does) or, for a backend built in this process (tests, Python), on the generation thread,
    which runs its steps while it has work and sleeps when it has none. Either way the event
    loop hands requests to the engine (`add`, thread-safe) and gets each outcome back through
    the same `_answer` as the other modes. `queue_time_ms` is submit -> the request's prefill
    began."""

    mode = "continuous"

    def __init__(self, backend: Backend | None = None, window_s: float = RECENT_WINDOW_S, *,
                 max_batch_size: int = DEFAULT_MAX_RUNNING,
                 step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        check_max_batch_size(max_batch_size)
        super().__init__(backend, window_s, max_batch_size=max_batch_size)
        self.step_timeout_s = step_timeout_s
        self._jobs: dict[Request, _Job] = {}  # submitted, not answered yet
        self._engine_loop: asyncio.Future | None = None
        self._closing = threading.Event()
        self._step_began: float | None = None  # the engine thread's step in progress
        self._abandoned: str | None = None

    def set_backend(self, backend: EngineBackend) -> None:
        super().set_backend(backend)
        if backend.engine_process:  # the engine's own clock: when it had work
            backend.engine.on_busy, backend.engine.on_idle = self.busy.start, self.busy.stop

    def _enqueue(self, job: _Job) -> None:
        if self._abandoned is not None:
            raise EngineGone(self._abandoned)
        loop = asyncio.get_running_loop()
        if self._engine_loop is None and not self.backend.engine_process:
            # after warm-up, which ran on the same thread
            self._engine_loop = loop.run_in_executor(self._executor, self._run_engine)

        def finished(outcome: Result | BaseException) -> None:
            if isinstance(outcome, BaseException):
                self.relay.post(self._answer, job, None, outcome)
                return
            outcome.memory_used_gb = self.backend.memory_used_gb()
            self.relay.post(self._answer, job, outcome, None)

        # PromptTooLong, or EngineGone: raised to the handler
        self.backend.engine.add(job.request, finished)
        self._jobs[job.request] = job
        self._in_flight += 1

    def _answer(self, job: _Job, result: Result | None, error: BaseException | None) -> None:
        super()._answer(job, result, error)
        self._jobs.pop(job.request, None)
        self._update_idle()

    def _run_engine(self) -> None:
        """The generation thread: step while there is work, sleep while there is none."""
        import torch

        engine = self.backend.engine
        while not self._closing.is_set():
            if not engine.wait_for_work(timeout=0.5):
                continue
            self.busy.start()
            try:
                while engine.has_work() and not self._closing.is_set():
                    self._step_began = time.perf_counter()  # cleared once the engine rests
                    engine.step()
            except (torch.OutOfMemoryError, MemoryError) as err:
                self._fail_all(engine, self._out_of_memory(err, len(self._jobs)))
            except Exception as err:  # reported to the clients; the engine must survive it
                log.exception("Engine step failed")
                self._fail_all(engine, err)
            finally:
                self._step_began = None
                self.busy.stop()

    def _fail_all(self, engine, error: BaseException) -> None:
        engine.reset()
        for job in list(self._jobs.values()):
            self.relay.post(self._answer, job, None, error)

    def failure(self) -> str | None:
        """The engine process is gone, or a step has run longer than `step_timeout_s`."""
        if self._abandoned is not None:
            return self._abandoned
        if self.backend is None:
            return None
        if self.backend.engine_process:
            stalled, gone = self.backend.engine.stalled_s(), self.backend.engine.failure
        else:
            began, gone = self._step_began, None
            stalled = time.perf_counter() - began if began is not None else 0.0
        if gone is None and stalled > self.step_timeout_s:
            return (f"the engine is wedged: a step has run for {stalled:.0f} s, over the "
                    f"{self.step_timeout_s:g} s limit (labkit serve --engine-step-timeout)")
        return gone

    def abandon(self, reason: str) -> None:
        """Fail every request in the engine with EngineGone(reason), and refuse new ones; an
        engine process is killed (a wedged one would never answer)."""
        self._abandoned = reason
        if self.backend is not None and self.backend.engine_process:
            self.backend.engine.kill(reason)  # its reader thread fails what it held
        else:
            for job in list(self._jobs.values()):
                self.relay.post(self._answer, job, None, EngineGone(reason))

    async def close(self) -> None:
        self._closing.set()
        await super().close()
        if self.backend is not None and self.backend.engine_process:
            await asyncio.get_running_loop().run_in_executor(None, self.backend.close)

    def stats(self) -> dict:
        engine = self.backend.engine.stats() if self.backend is not None else {}
        if self.failure() is not None:  # the engine's last figures are not its state now
            engine = {**engine, "running": 0, "waiting": 0, "kv_pages_used": 0}
        # No batches here: the batch is re-formed every step (decode_steps, tokens_per_step).
        return {**super().stats(), **engine,
                "queue_depth": engine.get("waiting", 0), "in_flight": engine.get("running", 0),
                "batches": None, "mean_batch_size": None, "max_wait_ms": None}


SCHEDULERS: dict[str, type] = {"sequential": SequentialScheduler, "batched": BatchedScheduler,
                               "continuous": ContinuousScheduler}
