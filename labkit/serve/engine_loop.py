"""The engine process's side of `labkit.serve.engine_process`: load, warm up, report ready, then
loop: take the API servers' messages (add, cancel, their counters, stop), run one engine step,
send each pipe its requests' news. Pipe 0 is the first API server's: it stops the engine, and
its loss ends it. The others' (`labkit serve --api-servers N`) join with a hello, are written
without blocking (what a pipe does not take at once waits in an outbox of its own; a server that
stops reading is dropped, not waited for), and their requests are cancelled when they go.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing.connection
import os
import signal
import struct
import sys
import time
from multiprocessing.reduction import ForkingPickler

import torch

from labkit.engine.model import tokenizer_dir
from labkit.engine.request import EngineGone, OutOfMemory, PromptTooLong, Request
from labkit.serve.backend import load_model_backend
from labkit.serve.schedulers import out_of_memory

log = logging.getLogger(__name__)

# Device memory readings in the step messages, at most this often: a reading asks the driver
# (cudaMemGetInfo), which costs host time in every step that carries one, while the GPU waits.
MEMORY_EVERY_S = 0.5
# The wait for messages while idle, when an outbox still holds bytes its pipe did not take.
FLUSH_EVERY_S = 0.01
FINAL_FLUSH_S = 2.0  # at the engine's stop, for the other servers to read what it still holds


def engine_main(conns: list, load_options: dict) -> None:
    """The engine process: load, warm up, report ready, then serve the pipes until told to
    stop or the first server is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server drains first, then stops us
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    try:
        backend = load_model_backend(**load_options)
        backend.warm_up()
    except BaseException as err:  # the server reports it and exits with 1
        conns[0].send(("failed", portable(err)))
        return
    run_engine(conns, backend)


def run_engine(conns, backend) -> None:
    """Report `backend` (loaded and warm) ready over the first pipe of `conns` (one, or one
    per API server), then serve them until told to stop or the first server is gone (in the
    engine process; a test runs it on a thread)."""
    conns = conns if isinstance(conns, list) else [conns]
    lm, cache = backend.lm, backend.engine.cache
    backend.engine.detokenize = False  # the server decodes results' token ids
    conns[0].send(("ready", {
        "name": backend.name, "synthetic": backend.synthetic, "device": backend.device,
        "gpu_name": backend.gpu_name, "context_length": backend.context_length,
        "load_time_s": backend.load_time_s, "cuda_graphs": backend.cuda_graphs,
        "cache_tokens": cache.tokens, "source": lm.source,
        "tokenizer_dir": str(tokenizer_dir(lm.source)), "num_parameters": lm.num_parameters,
        "stats": backend.engine.stats(), "memory": _memory(backend.device),
        "pid": os.getpid()}))
    log.info("Engine process ready (pid %d): %s over %s", os.getpid(),
             "the server talks to it" if len(conns) == 1 else f"{len(conns)} API servers talk "
             "to it", "a pipe" if len(conns) == 1 else "a pipe each")
    try:
        _EngineLoop(backend, conns).run()
    except (BrokenPipeError, ConnectionResetError):  # the first server died mid-send
        log.warning("The server is gone: the engine process stops")


class _EngineLoop:
    """The engine's loop over its pipes: pipe 0 is the first API server's (it stops the
    engine, and its end is the engine's end); the others' join with a hello and their
    requests are cancelled if they go."""

    def __init__(self, backend, conns: list):
        self.backend, self.engine, self.conns = backend, backend.engine, conns
        # The other API servers' pipes are written without blocking: one that stops reading
        # fills its own outbox, not this loop's step (pipe 0, the first's, is written as is).
        # Not from threads: each would take the GIL from this loop several times a message.
        self.outboxes = {i: _Outbox(conn) for i, conn in enumerate(conns) if i > 0}
        self.open = set(range(len(conns)))  # pipes not closed
        self.heard = {0}  # pipes that said hello: the engine sends to those
        self.requests: dict[tuple[int, int], Request] = {}  # (pipe, the server's id)
        # Per pipe, this step: (rid, token) of streaming requests; (rid, Result or an error)
        self.tokens: dict[int, list] = {i: [] for i in self.open}
        self.outcomes: dict[int, list] = {i: [] for i in self.open}
        self.reports: dict[int, dict] = {}  # each other API server's counters, lately
        self.reports_changed = False
        self.busy = False  # since the first message of work, until the engine rests
        self.stopping = False
        self.memory_read_at = 0.0

    def run(self) -> None:
        while True:
            if not self.engine.has_work():
                # At rest: say so before waiting for messages, or the wait (up to 0.5 s) would
                # count as busy time in the server's /stats.
                if any(self.outcomes.values()):  # refused on arrival: answered now
                    self._send_step()
                if self.busy:
                    self.busy = False
                    self._broadcast(("idle", time.perf_counter(), self.engine.stats()))
                if self.stopping:
                    self._broadcast(("stopped",))
                    deadline = time.monotonic() + FINAL_FLUSH_S  # the last news still queued
                    while self._flush() and time.monotonic() < deadline:
                        time.sleep(FLUSH_EVERY_S)
                    return
            if not self._take_messages(timeout=0 if self.engine.has_work() else
                                       FLUSH_EVERY_S if self._flush() else 0.5):
                return  # the first server is gone: nobody is left to answer
            if self.reports_changed:  # a few times a second, not in every step's message
                self.reports_changed = False
                self._broadcast(("reports", dict(self.reports)))
            if self.engine.has_work():
                if not self.busy:
                    self.busy = True
                    self._broadcast(("busy", time.perf_counter()))
                self._step()

    def _flush(self) -> bool:
        """Write what the outboxes hold and their pipes take now; True if some is left."""
        left = False
        for index, outbox in list(self.outboxes.items()):
            if index in self.open and outbox.pending:
                if not outbox.flush():
                    self._drop(index)
                left = left or bool(outbox.pending)
        return left

    def _take_messages(self, timeout: float) -> bool:
        """Every message waiting on any pipe (waiting up to `timeout` for one); False once
        the first server's pipe is closed."""
        ready = multiprocessing.connection.wait([self.conns[i] for i in self.open], timeout)
        for conn in ready:
            index = self.conns.index(conn)
            try:
                while conn.poll(0):
                    self._handle(index, conn.recv())
            except (EOFError, OSError):
                if index == 0:
                    return False
                self._drop(index)
        return True

    def _handle(self, index: int, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            _, rid, fields, streams = message
            request = Request(**fields, checked=True)  # checked on the server's side
            if streams:
                request.on_token = lambda token, i=index, rid=rid: self.tokens[i].append(
                    (rid, token))
            self.requests[index, rid] = request
            try:  # checked to fit on the server's side; `add` checks only what was not
                self.engine.add(request, lambda result, i=index, rid=rid: self._finished(
                    i, rid, result))
            except Exception as err:  # PromptTooLong, for a request sent unchecked
                self._finished(index, rid, portable(err))
        elif kind == "cancel":
            request = self.requests.get((index, message[1]))
            if request is not None:
                request.cancelled.set()
        elif kind == "report":
            self.reports[index] = message[1]
            self.reports_changed = True
        elif kind == "hello":
            self.heard.add(index)
            if self.busy:  # its busy clock starts now, not at the next busy period
                self._send(index, ("busy", time.perf_counter()))
            if self.reports:  # the others' counters so far, not only from their next change
                self._send(index, ("reports", dict(self.reports)))
        elif kind == "stop" and index == 0:
            self.stopping = True

    def _drop(self, index: int) -> None:
        """Another API server is gone, or stopped reading: cancel what it had here; nothing
        more goes to it, and its pipe is closed (a stalled one sees the engine gone). Its last
        counters stay in the others' totals (a counter never goes down)."""
        if index not in self.open:
            return
        self.open.discard(index)
        self.heard.discard(index)
        self.outboxes[index].close()
        its = [request for (i, _), request in self.requests.items() if i == index]
        for request in its:
            request.cancelled.set()
        log.warning("API server %d's pipe closed: its %d request(s) cancelled", index + 1,
                    len(its))

    def _finished(self, index: int, rid: int, outcome) -> None:
        self.requests.pop((index, rid), None)
        if index in self.open:
            self.outcomes[index].append((rid, outcome))

    def _step(self) -> None:
        try:
            self.engine.step()
        except (torch.OutOfMemoryError, MemoryError) as err:
            self._fail_all(out_of_memory(self.backend, err, len(self.requests)))
        except Exception as err:  # reported to the clients; the engine must survive it
            log.exception("Engine step failed")
            self._fail_all(err)
        self._send_step()

    def _fail_all(self, err: BaseException) -> None:
        self.engine.reset()
        for index, rid in list(self.requests):
            self._finished(index, rid, portable(err))

    def _send_step(self) -> None:
        memory = None
        now = time.perf_counter()
        if now - self.memory_read_at >= MEMORY_EVERY_S:
            memory, self.memory_read_at = _memory(self.backend.device), now
        stats = self.engine.stats()
        for index in sorted(self.heard):
            self._send(index, ("step", self.tokens[index], self.outcomes[index], stats, memory))
            self.tokens[index], self.outcomes[index] = [], []

    def _broadcast(self, message: tuple) -> None:
        for index in sorted(self.heard):
            self._send(index, message)

    def _send(self, index: int, message: tuple) -> None:
        """Send on pipe `index`: the first's as is (its loss ends the engine); another's through
        its outbox, whose failure or overflow drops that server."""
        if index == 0:
            self.conns[0].send(message)
        elif not self.outboxes[index].send(message):
            log.warning("API server %d stopped reading the engine's messages: dropped", index + 1)
            self._drop(index)


class _Outbox:
    """Another API server's pipe, written from the loop without blocking it: the bytes the pipe
    does not take at once wait here, in order, and go first at the next send or flush. Framed
    as `Connection.send` frames a message (the server reads it with `recv`)."""

    LIMIT = 2000  # messages: some 10 s of steps

    def __init__(self, conn):
        self.conn, self.failed = conn, False
        self.pending: collections.deque[memoryview] = collections.deque()

    def send(self, message: tuple) -> bool:
        """Send `message`, or what of it the pipe takes now; False once the pipe failed or the
        server fell LIMIT messages behind."""
        if not self.failed:
            data = ForkingPickler.dumps(message)
            self.pending.append(memoryview(_frame_header(len(data)) + data))
            self.failed = len(self.pending) > self.LIMIT or not self.flush()
        return not self.failed

    def flush(self) -> bool:
        """Write what the pipe takes now; False if it is closed. Only the loop's thread uses
        the pipe, so it is non-blocking just while it writes here (reads block, as ever)."""
        fd = self.conn.fileno()
        os.set_blocking(fd, False)
        try:
            while self.pending:
                written = os.write(fd, self.pending[0])
                if written < len(self.pending[0]):
                    self.pending[0] = self.pending[0][written:]
                    break
                self.pending.popleft()
        except BlockingIOError:  # full: the rest goes at the next send or flush
            pass
        except OSError:  # closed: the server is gone
            self.failed = True
        finally:
            if not self.failed:
                os.set_blocking(fd, True)
        return not self.failed

    def close(self) -> None:
        self.failed = True
        self.pending.clear()
        self.conn.close()


def _frame_header(size: int) -> bytes:
    """The length header `Connection.send` writes before a message of `size` bytes (4 bytes;
    over 2 GiB, -1 then 8 bytes), which `Connection.recv` reads."""
    if size > 0x7FFFFFFF:
        return struct.pack("!i", -1) + struct.pack("!Q", size)
    return struct.pack("!i", size)


def _memory(device: str) -> dict | None:
    """gpu.memory_gb of the engine's card, read in the engine's process (where torch holds
    the memory); None on the CPU."""
    from labkit.measure import gpu

    if not device.startswith("cuda"):
        return None
    return gpu.memory_gb(int(device.split(":")[1]) if ":" in device else 0)


# Errors cross the pipe as (kind, message): an exception's own class may not unpickle (torch's
# need torch, others carry arguments their constructor does not take).
_KINDS = {"OutOfMemory": OutOfMemory, "PromptTooLong": PromptTooLong,
          "EngineGone": EngineGone}


def portable(err: BaseException) -> tuple[str, str]:
    return type(err).__name__, str(err)


def rebuild(portable: tuple[str, str]) -> BaseException:
    kind, message = portable
    if kind in _KINDS:
        return _KINDS[kind](message)
    return RuntimeError(f"{kind} in the engine process: {message}")
