"""The continuous-batching engine in a process of its own (`labkit serve --mode continuous`).

Why a process: a thread shares the server's GIL. Every torch call of an engine step lets the GIL
go, and the event loop, busy with HTTP and JSON, holds it on for up to the switch interval
(5 ms) before the engine gets it back: the GPU idles while the step waits for Python. Streaming
at concurrency 256 on an H200 (benchmarks/RESULTS.md, "Continuous batching engine"), where the
server detokenizes and writes some 20k events a second, the engine on the server's thread gave
17.4k output tok/s and almost never waited for the GPU; in its own process, 23.4k. vLLM's
engine core runs apart from its API server for the same reason.

    server process                                  engine process
    event loop: HTTP, JSON, tokenizing    --add-->     load model, warm up, then loop:
                                         --cancel->     take messages, one engine step,
    reader thread: stream tokens,        <--step---     send that step's news
      answer finished requests           <--busy/idle-  (perf_counter: one clock for both)

One pipe per API server (one, unless `labkit serve --api-servers N`: `labkit.serve.api_servers`),
one message per engine step on each: the new tokens of that server's requests that stream, its
finished ones' results, and the engine's /stats counters (with the other servers' counters, which
each reports through the engine). Requests cross as their fields,
token ids included, and results come back as token ids: the server tokenizes and detokenizes,
so the engine's loop spends its time on the GPU's next step, not on text. A request is checked
once, on the server's side (its fields where it entered, its fit to the context and to this
engine's KV cache in `tokenize`): the engine process takes it as checked. The
engine process ignores SIGINT and SIGTERM: the server drains its requests first, then tells the
engine to stop. When the first server dies, its pipe closes and the engine exits at its next
step; when another one does, the engine cancels what that one had in it. This module is the
servers' side; the engine process runs `labkit.serve.engine_loop`.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

from labkit.engine import continuous, text
from labkit.engine.model import LoadedModel, load_tokenizer, tokenizer_dir
from labkit.engine.request import EngineGone, Request, Result
from labkit.serve import engine_loop

log = logging.getLogger(__name__)

# Request fields that cross the pipe (the hooks, a callback and a threading.Event, stay here).
FIELDS = ("prompt", "max_tokens", "temperature", "top_p", "seed", "min_tokens", "ignore_eos",
          "templated", "prompt_ids", "fits_cache")
STOP_TIMEOUT_S = 30.0
# With numpy packing, streamed TTFT fell 30-40 % (benchmarks/RESULTS.md, "Third pass").
READER_SWITCH_INTERVAL_S = 0.0005
# An API server's counters go to the others (through the engine) at most this often.
REPORT_EVERY_S = 0.25


# --- the server's side -------------------------------------------------------------------------

class EngineClient:
    """An API server's side of one pipe to the engine process: `add` a request with a callback
    for its outcome (a Result, or the exception that failed it), read `stats()`. Tokens and
    results come back on a reader thread, which calls the requests' `on_token` hooks and the
    callbacks there, as the engine's own thread would in one process. With several API servers
    (`labkit serve --api-servers N`) each has a pipe of its own, `index` 0 the first one's; the
    others also `report` their counters, which the engine passes on to all (`reports`)."""

    def __init__(self, conn, index: int = 0, engine_pid: int | None = None):
        self._conn = conn
        self.index = index
        self.engine_pid = engine_pid
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._live: dict[int, tuple[Request, Callable]] = {}  # sent, outcome not back yet
        self._cancel_sent: set[int] = set()
        self._stats: dict = {}
        self.memory: dict | None = None  # the engine's device memory (gpu.memory_gb), lately
        self.on_busy: Callable[[float], None] = lambda at: None
        self.on_idle: Callable[[float], None] = lambda at: None
        self.gone: str | None = None  # why the engine process is gone, once it is
        self._kill_reason: str | None = None
        self._busy = False
        self._heard = time.perf_counter()  # the engine's last message
        self._sent_to_idle = 0.0  # when work went to an engine that said it was idle
        # A result's text from its token ids, on the reader thread (set by the backend, which
        # holds the tokenizer): the engine sends ids only.
        self.detokenize: Callable[[list[int]], str] = lambda ids: ""
        # This server's counters for the others (set by the server when there are several),
        # sent at most every REPORT_EVERY_S when they changed.
        self.report: Callable[[], dict] | None = None
        self._reported: dict | None = None
        self._report_due = 0.0
        self.reports: dict[int, dict] = {}  # every API server's counters, as last passed on
        self._closed = False

    def attach(self, info: dict) -> None:
        """Start reading the pipe (an API server after the first: `info` is the engine's
        description, passed on by the first)."""
        self.engine_pid = info["pid"]
        self._stats, self.memory = info["stats"], info["memory"]
        self._send(("hello",))  # from now on the engine sends this pipe its steps
        self._start_reader()

    def _start_reader(self) -> None:
        # The reader thread and the event loop share this process's GIL: a thread that wants
        # it waits up to the switch interval (5 ms by default, an engine step) for the other.
        sys.setswitchinterval(READER_SWITCH_INTERVAL_S)
        threading.Thread(target=self._read, name="labkit-engine-reader", daemon=True).start()

    def add(self, request: Request, on_outcome: Callable[[Result | BaseException], None]
            ) -> None:
        """Send `request` (tokenized) to the engine; `on_outcome` gets its Result, or the
        error that stopped it, on the reader thread."""
        if self.gone is not None:
            raise EngineGone(self.gone)
        rid = next(self._ids)
        if not self._live:
            self._sent_to_idle = time.perf_counter()
        self._live[rid] = (request, on_outcome)
        fields = {name: getattr(request, name) for name in FIELDS}
        self._send(("add", rid, fields, request.on_token is not None))

    def stats(self) -> dict:
        return self._stats

    @property
    def failure(self) -> str | None:
        """Why this server can no longer generate: the engine process is gone."""
        return self.gone

    def stalled_s(self) -> float:
        """Seconds the engine has had work without sending news: since its last message while
        it is busy, and since work was sent to it while it says it is idle (an engine frozen
        at rest never says "busy", and would otherwise never count as stalled); 0 with
        nothing sent and unanswered."""
        if self.gone is not None:
            return 0.0
        now = time.perf_counter()
        if self._busy:
            return now - self._heard
        if self._live:
            return now - max(self._heard, self._sent_to_idle)
        return 0.0

    def kill(self, reason: str) -> None:
        """Kill the engine process (wedged): its requests fail with EngineGone(reason)."""
        self._kill_reason = reason
        if self.engine_pid is not None and self.gone is None:  # gone: its pid may be reused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.engine_pid, signal.SIGKILL)

    def close(self) -> None:
        """Let go of the engine: it cancels what this server still had in it."""
        self._closed = True
        self._conn.close()

    def _send(self, message: tuple) -> None:
        with self._send_lock:  # the event loop adds, the reader thread cancels
            self._conn.send(message)

    def _read(self) -> None:
        while True:
            try:
                if self.report is not None:  # wake up to report, idle or not
                    self._report_if_due()
                    if not self._conn.poll(REPORT_EVERY_S):
                        continue
                message = self._conn.recv()
            except (EOFError, OSError, TypeError):  # TypeError: closed here while waiting
                if not self._closed:
                    self._engine_exited()
                return
            self._heard = time.perf_counter()
            kind = message[0]
            if kind == "step":
                self._take_step(*message[1:])
            elif kind == "busy":
                self._busy = True
                self.on_busy(message[1])
            elif kind == "idle":
                self._busy = False
                self._stats = message[2]
                self.on_idle(message[1])
            elif kind == "reports":
                self.reports = message[1]
            elif kind == "stopped":
                return

    def _report_if_due(self) -> None:
        """This server's counters, every REPORT_EVERY_S at most, if they changed since they
        were last sent (not at every step: they are read from the scheduler and metrics)."""
        now = time.monotonic()
        if now < self._report_due:
            return
        self._report_due = now + REPORT_EVERY_S
        report = self.report()
        if report != self._reported:
            self._send(("report", report))
            self._reported = report

    def _take_step(self, tokens: list, outcomes: list, stats: dict, memory) -> None:
        self._stats = stats
        if memory is not None:
            self.memory = memory
        for rid, token in tokens:
            if rid in self._live:
                self._live[rid][0].emit(token)  # a streaming response's text, as it grows
        for rid, outcome in outcomes:
            request, on_outcome = self._live.pop(rid)
            self._cancel_sent.discard(rid)
            if isinstance(outcome, tuple):
                outcome = engine_loop.rebuild(outcome)
            elif request.wants_text:  # a stream has its text from its tokens already
                outcome.generated_text = self.detokenize(outcome.token_ids)
            on_outcome(outcome)
        # A client that went away (or a stop string seen in the text) sets the request's
        # `cancelled` here; the engine hears of it before its next step.
        for rid, (request, _) in list(self._live.items()):
            if request.cancelled.is_set() and rid not in self._cancel_sent:
                self._cancel_sent.add(rid)
                self._send(("cancel", rid))

    def _engine_exited(self) -> None:
        self.gone = self._kill_reason or self._exit_reason()
        self.gone += ". Restart the server."
        if self._live:
            log.error("%s %d request(s) failed with it.", self.gone, len(self._live))
        for rid in list(self._live):
            self._live.pop(rid)[1](EngineGone(self.gone))
        self.on_idle(time.perf_counter())

    def _exit_reason(self) -> str:
        return "the engine process exited; the first server's log says why"


class EngineProcess(EngineClient):
    """The first API server's handle on the engine process, which it starts and stops; with
    several API servers it also makes the others' pipes (`server_conns`) and watches the
    processes it started them in (`watch`): one that dies takes the server down."""

    def __init__(self, load_options: dict, api_servers: int = 1):
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        pipes = [context.Pipe() for _ in range(api_servers)]
        super().__init__(pipes[0][0])
        self.server_conns = [ours for ours, _ in pipes[1:]]  # for the other API servers
        self._process = context.Process(target=engine_loop.engine_main,
                                        args=([theirs for _, theirs in pipes], load_options),
                                        name="labkit-engine", daemon=True)
        self._servers: list = []  # the other API servers' processes
        self._servers_timeout_s = STOP_TIMEOUT_S  # their drain, at most
        self._stopping = False

    def start(self) -> dict:
        """Start the process and wait until its model is loaded and warm: its description."""
        self._process.start()
        try:
            kind, payload = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise EngineGone(f"the engine process exited while loading (exit code "
                             f"{self._process.exitcode}); its log lines above say why") from None
        if kind == "failed":
            self._process.join(5)
            raise engine_loop.rebuild(payload)
        self.engine_pid = payload["pid"]
        payload["api_servers"] = len(self.server_conns) + 1
        self._stats, self.memory = payload["stats"], payload["memory"]
        # The engine ignores SIGTERM (we stop it), and multiprocessing joins it at exit: if this
        # process exits without `close` (a start-up cut short), kill it rather than hang there.
        atexit.register(self._kill_if_alive)
        self._start_reader()
        return payload

    def watch(self, servers: list, drain_timeout_s: float) -> None:
        """The other API servers' processes, started (they drain for up to `drain_timeout_s`
        when stopped): a pipe's end that each took is closed here, so that the engine hears
        when one goes."""
        self._servers = servers
        self._servers_timeout_s = drain_timeout_s + STOP_TIMEOUT_S
        for conn in self.server_conns:
            conn.close()

    @property
    def failure(self) -> str | None:
        """Why serving must stop: the engine is gone, or another API server's process died."""
        if self.gone is not None or self._stopping:
            return self.gone
        for index, process in enumerate(self._servers, start=1):
            if process.exitcode is not None:
                return (f"API server {index + 1} of {len(self._servers) + 1} exited (exit code "
                        f"{process.exitcode}); its log lines above say why. Restart the server.")
        return None

    def stop_servers(self) -> None:
        """Ask the other API servers to drain and stop (SIGTERM), as this one does; once (a
        second SIGTERM stops a server at once)."""
        if self._stopping:
            return
        self._stopping = True
        for process in self._servers:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def close(self) -> None:
        """Wait for the other API servers, ask the engine to stop (it finishes what it holds),
        then wait for it to exit."""
        self.stop_servers()
        deadline = time.monotonic() + self._servers_timeout_s  # they drain side by side
        for process in self._servers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("An API server did not stop within %.0f s: killed",
                            self._servers_timeout_s)
                process.kill()
        try:
            self._send(("stop",))
        except OSError:
            pass  # gone already
        self._process.join(STOP_TIMEOUT_S)
        if self._process.is_alive():
            log.warning("The engine process did not stop within %.0f s: killed", STOP_TIMEOUT_S)
            self._process.kill()
            self._process.join(5)

    def kill(self, reason: str) -> None:
        self._kill_reason = reason
        self._process.kill()

    def _kill_if_alive(self) -> None:
        if self._process.is_alive():
            self._process.kill()

    def _exit_reason(self) -> str:
        self._process.join(5)
        return (f"the engine process exited (exit code {self._process.exitcode}); the server's "
                "log says why")


class EngineProcessBackend(text.TextSide):
    """A model served by the continuous engine in its own process. This side keeps only the
    tokenizer (prompts are checked and tokenized here, streamed text is detokenized here);
    the weights, the KV cache and the CUDA graphs live in the engine process."""

    engine_process = True
    cuda_graphs: bool

    def __init__(self, engine: EngineClient, info: dict):
        super().__init__(LoadedModel(
            model=None, tokenizer=load_tokenizer(info["tokenizer_dir"]), name=info["name"],
            source=info["source"], synthetic=info["synthetic"], device=None, dtype=None,
            num_parameters=info["num_parameters"], load_time_s=info["load_time_s"],
            context_length=info["context_length"], memory_after_load=None))
        self.engine, self.info = engine, info
        engine.detokenize = lambda ids: text.decode(self.lm, ids)
        for name in ("name", "source", "synthetic", "device", "gpu_name", "context_length",
                     "load_time_s", "cuda_graphs"):
            setattr(self, name, info[name])
        self.cache_tokens = info["cache_tokens"]
        self.token_budget = min(self.context_length, self.cache_tokens)

    @classmethod
    def start(cls, source: str, api_servers: int = 1, **load_options) -> EngineProcessBackend:
        """Start the engine process with `load_model_backend`'s options (continuous mode), with
        a pipe for each of `api_servers`. A source that does not resolve fails here, before a
        process is spawned."""
        tokenizer_dir(source)
        engine = EngineProcess({"source": source, **load_options}, api_servers)
        return cls(engine, engine.start())

    @classmethod
    def attach(cls, conn, index: int, info: dict) -> EngineProcessBackend:
        """Another API server's backend, over pipe `index` of an engine already running."""
        backend = cls(EngineClient(conn, index), info)
        backend.engine.attach(info)
        return backend

    def tokenize(self, request: Request) -> None:
        """The prompt's ids and its fit, checked once: the model's context, then the engine's
        KV cache (`continuous.check_fits`), so the engine process need not check it again."""
        super().tokenize(request)
        continuous.check_fits(request, self.cache_tokens)

    def warm_up(self) -> None:
        """Done in the engine process before it reported ready."""

    def free_memory(self) -> None:
        """The engine process frees its own memory after an out-of-memory error."""

    def memory_used_gb(self) -> float | None:
        return self.engine.memory["allocated_gb"] if self.engine.memory else None

    def memory_gb(self) -> dict | None:
        return self.engine.memory

    def close(self) -> None:
        self.engine.close()
