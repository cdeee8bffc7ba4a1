"""Start `labkit serve` as a subprocess from a notebook or a test, and never leave it behind.

    with labkit.serve.launcher.launch(model="model") as srv:
        requests.post(srv.url + "/generate", json={...})
        print(srv.logs())

The server picks a free port itself (`--port 0`) and prints its address, so several servers can
start at once without racing for ports (`launch_many`). Cleanup happens on context exit, at
interpreter exit (`atexit`), and when this process dies without either (a kernel restart, a
SIGKILL): the server watches its stdin pipe, which closes with us (`labkit serve --watch-parent`).

Deliberately free of torch: importing this module is cheap.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator, Sequence

LOG_LINES_KEPT = 20_000
_URL_LINE = re.compile(r"Serving on (http://\S+)")
_live: weakref.WeakSet[ServerProcess] = weakref.WeakSet()
# Our servers are local: never route the readiness check through an HTTP(S)_PROXY.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log."""


class ServerProcess:
    """One `labkit serve` subprocess. Use `launch()` rather than building this directly."""

    def __init__(self, model: str = "model", *, port: int | None = None,
                 host: str = "127.0.0.1", device: str = "auto", dtype: str = "auto",
                 max_tokens_limit: int = 1024, mode: str = "sequential", warmup: int = 1,
                 threads: int | None = None,
                 extra_args: Sequence[str] = (), env: dict[str, str] | None = None,
                 echo: bool = False, command: Sequence[str] | None = None):
        self.model = model
        self.host = host
        # `command` replaces `labkit serve` with another server (tests, benchmarks); it must
        # print "Serving on http://HOST:PORT" and answer GET / with {"model_loaded": ...}.
        self.command = list(command) if command else [
            sys.executable, "-m", "labkit", "serve", "--model", model, "--host", host,
            "--port", str(0 if port is None else port), "--device", device, "--dtype", dtype,
            "--max-tokens-limit", str(max_tokens_limit), "--mode", mode,
            "--warmup", str(warmup), "--watch-parent",
            *(["--threads", str(threads)] if threads else []), *extra_args,
        ]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.echo = echo  # also print the server's log lines here as they arrive
        self.url: str | None = None
        self.process: subprocess.Popen | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._url_seen = threading.Event()
        self._terminated = False
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self) -> ServerProcess:
        """Spawn the server; returns at once (see `wait_ready`)."""
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, env=self.env, text=True, bufsize=1,
            # Own session: a notebook's "interrupt kernel" (SIGINT to the kernel's process
            # group) interrupts the cell, not the server. The stdin pipe still ties it to us.
            start_new_session=True,
        )
        _live.add(self)
        self._reader = threading.Thread(target=self._read_output, daemon=True,
                                        name=f"labkit-server-log-{self.process.pid}")
        self._reader.start()
        return self

    def wait_ready(self, timeout: float = 300.0) -> ServerProcess:
        """Block until GET / says model_loaded; raise ServerStartError with the log tail if the
        server exits or the timeout passes first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                raise ServerStartError(
                    f"labkit serve --model {self.model} exited with status "
                    f"{self.process.returncode} before it was ready.\n{self._tail()}")
            if self._url_seen.is_set() and self._model_loaded():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServerStartError(f"labkit serve --model {self.model} was not ready after "
                               f"{timeout:.0f} s (stopped it).\n{self._tail()}")

    def logs(self, tail: int | None = None) -> str:
        """The server's log so far (stdout and stderr), or its last `tail` lines."""
        lines = list(self._lines)
        return "\n".join(lines[-tail:] if tail else lines)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def terminate(self) -> None:
        """Send SIGTERM without waiting (the server drains, then exits). Only once: a second
        signal tells labkit serve to stop at once, abandoning accepted requests."""
        if self.process is not None and self.process.poll() is None and not self._terminated:
            self._terminated = True
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (accepted requests finish), then SIGKILL after `timeout` s. Returns the exit
        status. Safe to call twice."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        if self._reader is not None:
            self._reader.join(timeout=2)
        _live.discard(self)
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running() else "stopped"
        return f"<labkit server {self.model} at {self.url} pid {self.pid} {state}>"

    def _read_output(self) -> None:
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self._lines.append(line)
            if self.echo:
                print(f"[server {self.pid}] {line}", flush=True)
            if self.url is None:
                match = _URL_LINE.search(line)
                if match:
                    self.url = match.group(1)
                    self._url_seen.set()

    def _model_loaded(self) -> bool:
        try:
            with _DIRECT.open(self.url + "/", timeout=2) as response:
                return bool(json.load(response).get("model_loaded"))
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _tail(self, lines: int = 40) -> str:
        return "--- last lines of the server log ---\n" + (self.logs(tail=lines) or "(empty)")


@contextlib.contextmanager
def launch(model: str = "model", port: int | None = None, *, timeout: float = 300.0,
           **options) -> Iterator[ServerProcess]:
    """Run `labkit serve` for the duration of a `with` block; yields once the model is loaded.
    `port=None` lets the server pick a free one (see `srv.url`). Other keyword arguments: host,
    device, dtype, max_tokens_limit, mode, warmup, threads, extra_args, env, echo, command."""
    server = ServerProcess(model, port=port, **options).start()
    try:
        server.wait_ready(timeout)
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def launch_many(count: int, model: str = "model", *, timeout: float = 300.0,
                **options) -> Iterator[list[ServerProcess]]:
    """Run `count` servers side by side (each on its own free port); they load in parallel.
    Per-server settings can go through `env` (e.g. CUDA_VISIBLE_DEVICES) by launching them
    individually with `ServerProcess` instead."""
    servers = [ServerProcess(model, **options) for _ in range(count)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_ready(timeout)
        yield servers
    finally:
        for server in servers:  # signal all first, so they drain in parallel
            server.terminate()
        for server in servers:
            server.stop()


def stop_all() -> None:
    """Stop every server this process launched (registered with atexit)."""
    servers = list(_live)
    for server in servers:
        server.terminate()
    for server in servers:
        server.stop(timeout=10)


atexit.register(stop_all)
