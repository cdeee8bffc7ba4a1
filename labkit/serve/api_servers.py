"""Several API-server processes over one engine (`labkit serve --api-servers N`, continuous mode).

Why: streaming, the server's process is the bottleneck before the GPU is. Each engine step
brings one token for every running stream, and each becomes a chunk of text, an SSE frame and
one socket send on that process's event loop (benchmarks/RESULTS.md: a fifth of its CPU in the
sends alone); at 256 streams on an H100 the engine waited for requests held up there. vLLM's
answer is `--api-server-count`: several processes, each with its own event loop, sockets and
GIL, in front of one engine core. So here:

    API server 1 (this process) ─┐  pipe 0: starts and stops the engine
    API server 2 (spawned)       ─┼─ pipe 1 ──▶ the engine process (one scheduler, one KV cache)
    ...                          ─┘  pipe N-1

All listen on the same port with SO_REUSEPORT (sockets made alike): the kernel spreads new
connections over them.
Each tokenizes, detokenizes and frames its own requests; the engine routes each step's tokens to
the pipe its request came from. Counters are per process, so each server reports its own to
the others through the engine (every 0.25 s at most): /stats and /metrics give the whole
server's figures whichever process answers. A SIGTERM to the first (or Ctrl-C, or systemd's
SIGTERM to the whole group) drains them all, the others stopping at the first's word only,
within --drain-timeout; one that dies, or stops reading the engine's messages, takes the server
down (exit status 3), for a supervisor to restart it whole.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # a spawned API server imports aiohttp and loads its tokenizer


def listen_sockets(host: str, port: int) -> list[socket.socket]:
    """The first API server's sockets, bound before anything loads: one per address that
    `host` names, as a lone server binds them (localhost: ::1 and 127.0.0.1 where the hosts
    file says so). Port 0: a free one, the same for every address, which the others then share.
    Each address is checked free first without SO_REUSEPORT: with it, a port another such
    server holds would be shared silently."""
    for family, address in _addresses(host, port):
        # EADDRINUSE here is labkit serve's "pick another --port"
        with _bound(family, (address[0], port, *address[2:]), reuse_port=False) as probe:
            port = probe.getsockname()[1]
    return shared_sockets(host, port)


def shared_sockets(host: str, port: int) -> list[socket.socket]:
    """Sockets on the shared port, one per address of `host`, the same in every API server
    (the kernel spreads connections only over sockets bound alike)."""
    sockets = []
    try:
        for family, address in _addresses(host, port):
            sockets.append(_bound(family, address, reuse_port=True))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple]]:
    """(family, socket address) of each address `host` names, once each, as asyncio's
    `create_server` (aiohttp's TCPSite: a lone API server) resolves them."""
    infos = socket.getaddrinfo(host or None, port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, address) for family, _, _, _, address in infos))


def _bound(family: socket.AddressFamily, address: tuple, reuse_port: bool) -> socket.socket:
    """A non-blocking TCP socket bound to `address`, made as asyncio makes a listening one."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:  # IPv4 goes to an IPv4 socket of its own
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class ApiServers:
    """The API servers after the first: started once the engine is ready, on `host` at the
    port of `socks` (the first's), with the first one's application and serving options."""

    def __init__(self, count: int, host: str, socks: list[socket.socket], app_options: dict,
                 serve_options: dict):
        self.count, self.host, self.socks = count, host, socks
        self.app_options, self.serve_options = app_options, serve_options
        self.engine = None
        self.servers: list[tuple] = []  # (process, prepared, go, ready)

    def start(self, backend) -> None:
        """Spawn the others over `backend`'s engine pipes; return once each has its tokenizer
        (else raise: the server does not start half-made). They listen only at `go`."""
        context = multiprocessing.get_context("spawn")
        host, port = self.host, self.socks[0].getsockname()[1]
        self.servers = []
        for index, conn in enumerate(backend.engine.server_conns, start=1):
            events = [context.Event() for _ in range(3)]  # prepared, go, ready
            process = context.Process(
                target=_server_main, name=f"labkit-api-server-{index + 1}", daemon=True,
                args=(index, self.count, conn, backend.info, host, port, self.app_options,
                      self.serve_options, *events))
            process.start()
            self.servers.append((process, *events))
        backend.engine.watch([process for process, *_ in self.servers],
                             self.serve_options["drain_timeout_s"])
        self.engine = backend.engine
        try:
            for index, (process, prepared, _, _) in enumerate(self.servers, start=2):
                _wait(prepared, index, self.count, process)
        except BaseException:  # nothing is left running: the engine ignores SIGTERM
            for process, *_ in self.servers:
                process.kill()
            backend.engine.kill("an API server did not start")
            raise

    def go(self) -> None:
        """Once the first is ready: the others listen (each only with its model side ready,
        so that no process on the port says it is loading after the first said it is not)."""
        for _, _, go, _ in self.servers:
            go.set()
        for index, (process, _, _, ready) in enumerate(self.servers, start=2):
            _wait(ready, index, self.count, process)
        log.info("%d API server processes share the port, one engine behind them",
                 self.count)

    def stop(self) -> None:
        """At the first's SIGTERM (or SIGINT): the others drain and stop too."""
        if self.engine is not None:
            self.engine.stop_servers()


def _wait(event, index: int, count: int, process) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not event.wait(0.2):
        if process.exitcode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"API server {index} of {count} "
                               + (f"exited while starting (exit code {process.exitcode})"
                                  if process.exitcode is not None else
                                  f"was not ready within {READY_TIMEOUT_S:g} s")
                               + "; its log lines above say why")


def _server_main(index: int, count: int, conn, info: dict, host: str, port: int,
                 app_options: dict, serve_options: dict, prepared, go, ready) -> None:
    """An API server after the first: its own event loop over pipe `index` to the engine."""
    from labkit.serve.engine_process import EngineProcessBackend
    from labkit.serve.http import create_app
    from labkit.serve.lifecycle import serve

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=f"%(levelname)s: [API server {index + 1}/{count}] %(message)s")
    _stop_with_parent()
    backend = EngineProcessBackend.attach(conn, index, info)
    prepared.set()
    go.wait()

    async def main() -> int:
        app = create_app(lambda: backend, **app_options)
        return await serve(app, host, port, socks=shared_sockets(host, port), follower=True,
                           on_ready=ready.set, **serve_options)

    sys.exit(asyncio.run(main()))


def _stop_with_parent() -> None:
    """A SIGTERM to ourselves when the first API server is gone (even SIGKILLed): it is the
    one a supervisor watches, and the engine goes with it."""
    parent = os.getppid()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="labkit-parent-pid", daemon=True).start()
