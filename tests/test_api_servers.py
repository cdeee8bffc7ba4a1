"""`labkit serve --api-servers N`: several API-server processes on one port in front of one
engine (`labkit.serve.api_servers`). On the CPU with the embedded model: the engine routes each
request's tokens and outcome to the pipe it came from and cancels what a closed pipe had; the
whole server answers streams from every process, counts them once whichever process answers
/stats or /metrics, drains them all on one SIGTERM, and goes down (exit 3) when one dies."""

from __future__ import annotations

import asyncio
import http.client
import multiprocessing
import os
import signal
import socket
import struct
import threading
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_continuous import PROMPTS, greedy, sequential_texts
from test_engine_failure import _engine_pid, _open_stream
from test_engine_process import Outcomes, wait_for
from test_one_check import _EngineThread

from labkit.engine import text
from labkit.engine.continuous import ContinuousEngine
from labkit.engine.kv_cache import PagedKVCache
from labkit.engine.llama import Llama
from labkit.engine.request import Request
from labkit.serve import api_servers, client, engine_loop, engine_process
from labkit.serve.backend import ContinuousBackend
from labkit.serve.launcher import ServerProcess

pytestmark = pytest.mark.slow
SERVER = dict(mode="continuous", warmup=0, threads=1, device="cpu")


def two_servers_on_one_engine(lm):
    """The engine loop on a thread over two real pipes; the first server's client (which
    starts it) and the second's (which says hello)."""
    cache = PagedKVCache(lm.config, 64, lm.dtype, lm.device)
    model_side = ContinuousBackend(lm, ContinuousEngine(lm, Llama.from_hf(lm.model), cache))
    first = engine_process.EngineProcess({}, api_servers=2)
    ends = [multiprocessing.Pipe() for _ in range(2)]
    first._conn, first.server_conns = ends[0][0], [ends[1][0]]
    first._process = _EngineThread(target=engine_loop.run_engine, daemon=True,
                                   args=([ends[0][1], ends[1][1]], model_side))
    first_backend = engine_process.EngineProcessBackend(first, first.start())
    return first_backend, engine_process.EngineProcessBackend.attach(ends[1][0], 1,
                                                                    first_backend.info)


def test_each_pipe_gets_its_own_tokens_and_outcomes_and_a_closed_one_is_cancelled(lm):
    first, second = two_servers_on_one_engine(lm)
    try:
        requests, streamed, outcomes = greedy(), {}, Outcomes()
        for index, request in enumerate(requests):
            request.on_token = streamed.setdefault(index, []).append
            backend = first if index % 2 else second
            backend.tokenize(request)
            backend.engine.add(request, outcomes.callback(index))
        results = outcomes.wait(len(requests))
        assert [text.decode(lm, results[i].token_ids) for i in range(len(requests))] == \
            sequential_texts(lm, requests)
        assert all(streamed[i] == results[i].token_ids for i in range(len(requests)))

        long = Request(PROMPTS[0], 900, 0.7, seed=1, ignore_eos=True)
        second.tokenize(long)
        started = threading.Event()
        long.on_token = lambda token: started.set()
        second.engine.add(long, lambda outcome: None)
        assert started.wait(30)
        second.close()  # that API server is gone: the engine cancels its request
        wait_for(lambda: first.engine.stats()["running"] == 0
                 and first.engine.stats()["kv_pages_used"] == 0)
        again, short = Outcomes(), Request(PROMPTS[1], 5, 0, ignore_eos=True)
        first.tokenize(short)
        first.engine.add(short, again.callback(0))
        assert again.wait(1)[0].tokens_generated == 5  # the first goes on serving
    finally:
        first.close()


def test_two_api_servers_share_the_port_count_once_and_stop_together():
    srv = ServerProcess(**SERVER, extra_args=["--api-servers", "2"]).start()
    try:
        srv.wait_ready(120)
        # ready is ready whichever process answers: none still loading after one said loaded
        assert all(client.get(srv.url + "/").body["model_loaded"] for _ in range(40))
        texts = asyncio.run(stream_completions(srv.url, 24))
        assert len(texts) == 24 and all(texts)
        answered_by = set()
        for _ in range(40):  # fresh connections: the kernel spreads them over both
            answered_by.add(client.get(srv.url + "/stats").body["server"]["api_server"])
        assert answered_by == {1, 2}
        # Each process counts its own requests and adds the other's (reported every 0.25 s).
        wait_for(lambda: all(served(srv.url) == 24 for _ in range(10)), timeout=5)
        wait_for(lambda: all(metric(srv.url, "labkit_time_to_first_token_seconds_count") == 24
                             for _ in range(10)), timeout=5)
        assert metric(srv.url, "vllm:generation_tokens_total") == 24 * 20
        children = child_pids(srv.pid)
        srv.terminate()
        assert srv.process.wait(30) == 0
        assert "[API server 2/2] Server stopped" in srv.logs()
        # each says what it holds itself, beside the engine's counts (every server's)
        assert "finishing this API server's 0 request(s) (the engine holds 0 queued + 0 " \
               "running from all 2)" in srv.logs()
        # the engine, the other API server and multiprocessing's resource tracker
        wait_for(lambda: not [pid for pid in children if alive(pid)], timeout=5)
    finally:
        srv.stop()


def test_ctrl_c_drains_every_api_servers_streams():
    """SIGINT to the whole process group (Ctrl-C; systemd sends SIGTERM so): every server
    drains, the others at the first's word only (it was their second signal: cut off)."""
    srv = ServerProcess(**SERVER, extra_args=["--api-servers", "2"]).start()
    try:
        srv.wait_ready(120)
        streams = [_open_stream(srv.url, max_tokens=150) for _ in range(12)]
        os.killpg(srv.pid, signal.SIGINT)  # its own session: the group is the server's alone
        for stream in streams:
            assert stream.read().decode().rstrip().endswith("data: [DONE]")
        assert srv.process.wait(30) == 0
        assert "SIGTERM again" not in srv.logs()
    finally:
        srv.stop()


def test_an_api_server_that_dies_takes_the_server_down_with_status_3():
    srv = ServerProcess(**SERVER, extra_args=["--api-servers", "2",
                                              "--failure-exit-delay", "2"]).start()
    try:
        srv.wait_ready(120)
        stream = _open_stream(srv.url)
        spawned = [pid for pid in child_pids(srv.pid)
                   if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
        second, = set(spawned) - {_engine_pid(srv)}  # the resource tracker is not spawn_main
        os.kill(second, signal.SIGKILL)
        # (a connection the kernel had queued on the dead one's socket is reset with it)
        wait_for(lambda: "API server 2 of 2 exited" in health_error(srv.url), timeout=5)
        try:  # ended either way, not left waiting: failed by the engine, or reset with the
            stream.read()  # process that died, if the kernel had given it that connection
        except (ConnectionResetError, http.client.IncompleteRead):
            pass
        assert srv.process.wait(15) == 3
    finally:
        srv.stop()


def test_a_busy_port_is_refused_before_anything_loads():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv = ServerProcess(**SERVER, port=port, extra_args=["--api-servers", "2"])
        srv.start()
        try:
            assert srv.process.wait(30) == 1
            assert "Pick another --port" in srv.logs()
        finally:
            srv.stop()


def test_every_api_server_binds_every_address_the_host_names(monkeypatch):
    """--host localhost where the hosts file names ::1 and 127.0.0.1 (as on most distributions):
    each API server binds both on one port, as a lone server's aiohttp does; a port held on
    either is refused."""
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    resolve = socket.getaddrinfo

    def hosts_file(host, port, *args, **kwargs):
        if host != "localhost":
            return resolve(host, port, *args, **kwargs)
        return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(socket, "getaddrinfo", hosts_file)
    first = api_servers.listen_sockets("localhost", 0)
    port = first[0].getsockname()[1]
    second = api_servers.shared_sockets("localhost", port)
    try:
        for socks in (first, second):
            assert [sock.getsockname()[:2] for sock in socks] == [("::1", port),
                                                                   ("127.0.0.1", port)]
            for sock in socks:
                sock.listen()
        for address in ("::1", "127.0.0.1"):
            socket.create_connection((address, port), timeout=5).close()
        with pytest.raises(OSError):  # another `labkit serve` on this port: "pick another"
            api_servers.listen_sockets("localhost", port)
    finally:
        for sock in first + second:
            sock.close()


def test_another_servers_pipe_is_written_without_blocking_and_dropped_once_it_stops_reading():
    """The engine writes the other servers' pipes from its loop (no threads): what a full pipe
    does not take waits, in order and framed as Connection.send frames it, and goes at the next
    flush; a server LIMIT messages behind is dropped; the engine's end still reads blocking."""
    ours, theirs = multiprocessing.Pipe()
    outbox = engine_loop._Outbox(theirs)
    big = [("step", list(range(i, i + 60_000)), [], {}, None) for i in range(10)]
    assert all(outbox.send(message) for message in big)  # no reader yet: never blocks
    assert outbox.pending and os.get_blocking(theirs.fileno())
    got = []
    reader = threading.Thread(target=lambda: got.extend(ours.recv() for _ in big))
    reader.start()
    while outbox.pending:
        assert outbox.flush()
    reader.join(10)
    assert got == big
    sent = 0
    while outbox.send(("step", [], [], {}, None)):  # nobody reads any more
        sent += 1
    assert sent >= outbox.LIMIT and len(outbox.pending) == outbox.LIMIT + 1
    gone, end = multiprocessing.Pipe()
    gone.close()
    assert engine_loop._Outbox(end).send(("busy", 1.0)) is False  # the server is gone


async def stream_completions(url: str, count: int) -> list[str]:
    body = {"prompt": "Suggest a skincare routine", "max_tokens": 20, "ignore_eos": True,
            "stream": True}

    async def one(session: aiohttp.ClientSession) -> str:
        async with session.post(url + "/v1/completions", json=body) as response:
            assert response.status == 200
            text = await response.text()
            assert text.rstrip().endswith("data: [DONE]")
            return text

    # one connection each, as separate clients: the kernel spreads them over the processes
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        return await asyncio.gather(*(one(s) for _ in range(count)))


def health_error(url: str) -> str:
    try:
        reply = client.get(url + "/health", timeout=2)
    except ConnectionResetError:
        return ""
    return reply.body.get("error", "") if reply.status == 503 else ""


def metric(url: str, sample: str) -> float:
    families = text_string_to_metric_families(client.get(url + "/metrics").body)
    return next(s.value for f in families for s in f.samples if s.name == sample)


def served(url: str) -> int:
    return client.get(url + "/stats").body["server"]["requests_served"]


def child_pids(pid: int) -> list[int]:
    """Every process under `pid` (the engine and the other API servers, and their helpers)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        for task in Path(f"/proc/{current}/task").iterdir():
            children = (task / "children").read_text().split()
            found += map(int, children)
            todo += map(int, children)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_the_outbox_frames_messages_as_connection_send_does():
    """Headers byte for byte as multiprocessing writes them, the 2 GiB one included."""
    ours, theirs = multiprocessing.Pipe()
    for size in (0, 5, 0x7FFFFFFF):
        assert engine_loop._frame_header(size) == struct.pack("!i", size)
    assert engine_loop._frame_header(0x80000000) == b"\xff\xff\xff\xff" + struct.pack(
        "!Q", 0x80000000)
    outbox = engine_loop._Outbox(theirs)
    for message in ((), ("step", [], [], {}, None), ("x" * 20_000,)):  # within a pipe buffer
        assert outbox.send(message)
        assert ours.recv() == message
