"""Running `labkit serve`: listen, load, serve until a signal, drain, stop, with an exit status.

The server listens at once and loads the model on a background thread, so readiness is
observable (the launcher reads the `Serving on` line for the address, then polls). SIGTERM and
SIGINT stop it gracefully: accepted requests finish, new ones get 503; a second signal stops at
once. An engine that dies or wedges is watched for here: its requests fail, and the server exits
with status 3 shortly after, for its supervisor to restart it. With `--watch-parent` it also
stops when the process that launched it is gone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable

from aiohttp import web

from labkit.serve import access
from labkit.serve.http import STATE, ServerState, describe_mode

log = logging.getLogger(__name__)

# The launcher looks for this line to learn the actual address (the port may be 0 = any free).
LISTENING_PREFIX = "Serving on "
EXIT_ENGINE_FAILED = 3  # the exit status after the engine died or wedged
FAILURE_POLL_S = 0.25


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 8000, *,
                watch_parent: bool = False, drain_timeout_s: float = 600.0,
                idle_timeout_s: float = access.DEFAULT_IDLE_TIMEOUT_S,
                max_connections: int = access.DEFAULT_MAX_CONNECTIONS,
                failure_exit_s: float = 10.0, socks: list[socket.socket] | None = None,
                follower: bool = False, on_ready: Callable[[], None] | None = None,
                on_stop: Callable[[], None] | None = None) -> int:
    """Listen, load, serve until a signal (or the parent's exit), drain, stop. Returns the exit
    status: 0 after a graceful stop, 1 when the model failed to load, 3 when the engine died or
    wedged (`failure_exit_s` after it did, or at a signal; negative: only at a signal).
    Several API servers (`labkit.serve.api_servers`) each listen on their `socks`, bound to the
    shared port; a `follower` (not the first) listens only once loaded and stops only at the
    first's SIGTERM; `on_ready` runs once the model is ready here (an error in it stops the
    server with status 1), `on_stop` when the stop begins."""
    state = app[STATE]
    runner, url = await _listen(app, host, port, idle_timeout_s, max_connections, socks,
                                follower)
    stop = asyncio.Event()
    _handle_stop_signals(state, stop, watch_parent, follower)
    watcher = asyncio.create_task(_announce_ready(state, stop, url, failure_exit_s, on_ready))
    await stop.wait()
    watcher.cancel()
    if on_stop is not None:
        on_stop()
    failure = state.failure()
    if state.load_error is None and failure is None:
        await _drain(state, drain_timeout_s)
    await runner.cleanup()
    log.info("Server stopped after serving %d request(s)", state.scheduler.served)
    if state.load_error is not None:
        return 1
    return EXIT_ENGINE_FAILED if failure is not None else 0


async def _listen(app: web.Application, host: str, port: int, idle_timeout_s: float,
                  max_connections: int, socks: list[socket.socket] | None = None,
                  follower: bool = False) -> tuple[web.AppRunner, str]:
    """Start listening on `host:port` (0: a free port), or on `socks`; the runner and the
    server's URL."""
    # keepalive_timeout runs from a connection's start until its request's headers are in,
    # and between requests: it bounds a slow sender of headers as much as an idle client.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=10.0, keepalive_timeout=idle_timeout_s)
    await runner.setup()  # starts loading the model
    if follower:  # another API server on a shared port: listen only once ready to serve
        await app[STATE].finished_loading.wait()
    access.cap_connections(runner.server, max_connections)
    sites = [web.SockSite(runner, sock) for sock in socks] if socks is not None \
        else [web.TCPSite(runner, host, port)]
    for site in sites:
        await site.start()
    bound_port = runner.addresses[0][1]
    url = server_url(host, bound_port)
    if follower:  # not the first API server: the launcher reads the first one's line
        log.info("Listening on %s beside the first API server", url)
    else:
        log.info("%s%s (model loading: /health answers 503 until it is ready)",
                 LISTENING_PREFIX, url)
    return runner, url


def server_url(host: str, port: int) -> str:
    """http://host:port, an IPv6 address in brackets (http://[::]:8000), as URLs write it."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _handle_stop_signals(state: ServerState, stop: asyncio.Event, watch_parent: bool,
                         follower: bool = False) -> None:
    """SIGTERM and SIGINT (and, with `watch_parent`, the parent's exit) set `stop`; a second
    one exits at once. A follower API server stops at SIGTERM only, once: the first forwards
    it one, and Ctrl-C or a whole process group's SIGTERM (systemd's) must not count as two."""
    loop = asyncio.get_running_loop()

    def request_stop(reason: str) -> None:
        if state.shutdown_reason is not None:  # second signal: no more waiting
            if follower:
                return
            log.warning("%s again: stopping now, abandoning queued requests", reason)
            logging.shutdown()
            os._exit(1)
        state.shutdown_reason = reason
        stop.set()

    if follower:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM,) if follower else (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop, sig.name)
    if watch_parent:
        _watch_parent(loop, request_stop)


async def _announce_ready(state: ServerState, stop: asyncio.Event, url: str,
                          failure_exit_s: float, on_ready: Callable[[], None] | None) -> None:
    """Once the model has loaded, say so and watch the engine; a failed load stops at once."""
    await state.finished_loading.wait()
    if state.load_error is not None:
        stop.set()
        return
    if on_ready is not None:  # may wait for other processes: off the event loop
        try:
            await asyncio.get_running_loop().run_in_executor(None, on_ready)
        except Exception as err:  # another API server did not come up: do not serve half
            log.error("Could not start serving: %s", err)
            state.load_error = err
            stop.set()
            return
    log.info("Ready: POST %s/generate (mode %s, max_tokens up to %d)", url,
             describe_mode(state.scheduler.stats()), state.max_tokens_limit)
    await _watch_engine(state, stop, failure_exit_s)


async def _drain(state: ServerState, drain_timeout_s: float) -> None:
    """Finish the queued and running requests, waiting at most `drain_timeout_s`."""
    stats = state.scheduler.stats()
    if state.api_servers > 1:  # the engine's counts are every server's
        log.info("Shutting down (%s): finishing this API server's %d request(s) (the engine "
                 "holds %d queued + %d running from all %d); new requests get 503",
                 state.shutdown_reason, state.scheduler.held(), stats["queue_depth"],
                 stats["in_flight"], state.api_servers)
    else:
        log.info("Shutting down (%s): finishing %d queued + %d running request(s); new "
                 "requests get 503", state.shutdown_reason, stats["queue_depth"],
                 stats["in_flight"])
    if not await state.scheduler.wait_idle(drain_timeout_s):
        log.warning("Gave up waiting for requests after %.0f s", drain_timeout_s)


async def _watch_engine(state: ServerState, stop: asyncio.Event, exit_after_s: float) -> None:
    """Poll for a dead or wedged engine; once seen, fail what it held (it will never answer),
    then stop the server `exit_after_s` later, so that a supervisor restarts it."""
    while (failure := state.scheduler.failure()) is None:
        await asyncio.sleep(FAILURE_POLL_S)
    log.error("The engine failed: %s Requests in it failed with 503; / and /health answer 503%s",
              failure if failure.endswith(".") else failure + ".",
              f"; stopping in {exit_after_s:g} s (exit status {EXIT_ENGINE_FAILED})"
              if exit_after_s >= 0 else "")
    state.scheduler.abandon(failure)
    if exit_after_s >= 0:
        await asyncio.sleep(exit_after_s)
        if state.shutdown_reason is None:
            state.shutdown_reason = "engine failed"
        stop.set()


def _watch_parent(loop: asyncio.AbstractEventLoop, request_stop) -> None:
    """Stop when the process that launched us dies (the notebook kernel, a test): the launcher
    holds our stdin pipe, which reads EOF once it is gone, even after a SIGKILL. The parent pid
    check covers a pipe that something else kept open."""
    parent = os.getppid()

    def on_parent_gone(how: str) -> None:
        loop.call_soon_threadsafe(request_stop, f"parent process {parent} {how}")

    def read_stdin() -> None:
        # os.read, not sys.stdin: a daemon thread blocked inside a buffered reader's lock makes
        # the interpreter abort at exit ("could not acquire lock ... at interpreter shutdown").
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        on_parent_gone("closed our stdin")

    def poll_ppid() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        on_parent_gone("exited")

    threading.Thread(target=read_stdin, name="labkit-parent-pipe", daemon=True).start()
    threading.Thread(target=poll_ppid, name="labkit-parent-pid", daemon=True).start()
