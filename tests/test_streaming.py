"""Streaming under pressure: a client that stops reading is cancelled once its frames pass a
bound, without slowing the other streams or the engine; and a thousand concurrent streams on
the CPU with the embedded model all complete, and the server comes back to idle."""

from __future__ import annotations

import json
import re
import resource
import socket
import time

import pytest
from stub_backend import StubBackend
from threaded_server import serving

from labkit.measure import loadtest
from labkit.serve import client, streaming
from labkit.serve.http import create_app
from labkit.serve.launcher import launch


def test_a_stalled_reader_is_cancelled_past_its_buffer_and_slows_no_one(monkeypatch):
    monkeypatch.setattr(streaming, "STREAM_BUFFER_BYTES", 16 * 1024)
    backend = StubBackend()
    backend.context_length = backend.token_budget = 100_000
    app = create_app(lambda: backend, mode="batched", max_batch_size=4, max_tokens_limit=50_000)
    with serving(app) as server:
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # and never read
        stalled.connect(("127.0.0.1", server.port))
        body = json.dumps({"prompt": "stall", "max_tokens": 50_000, "ignore_eos": True,
                           "stream": True}).encode()  # some 9 MB of frames
        stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 20
        while not backend.results:
            assert time.monotonic() < deadline, "the stalled stream was never cancelled"
            time.sleep(0.01)
        [stall] = backend.results
        assert stall.finish_reason == "cancelled" and stall.tokens_generated < 50_000
        # its writer waited on the socket, the generation never did: the engine ran at its pace
        assert stall.inference_time_ms / stall.tokens_generated < 1.0
        status, data = server.post("/v1/completions", json.dumps(
            {"prompt": "reader", "max_tokens": 50, "stream": True}).encode())
        assert status == 200 and data.endswith(b"data: [DONE]\n\n")
        stats = server.stats()
        assert stats["in_flight"] == 0 and stats["requests_cancelled"] == 1
        assert stats["requests_served"] == 1
        stalled.close()


@pytest.mark.slow
def test_a_thousand_concurrent_streams_complete_and_the_server_comes_back_to_idle():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # a thousand sockets each side, and the server inherits the limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    with launch("model", mode="continuous", device="cpu", warmup=0, threads=1,
                max_tokens_limit=64, timeout=120) as srv:
        rss = []
        for _ in range(2):
            result = loadtest.run(srv.url, concurrency=1000, requests=1000, max_tokens=12,
                                  api="openai", ignore_eos=True, progress=False, timeout=120)
            s = result.summary()
            assert s["successful"] == 1000, s["errors"] if "errors" in s else s
            assert s["output_tokens"] == 12_000
            server = client.get(srv.url + "/stats").body["server"]
            assert server["running"] == server["waiting"] == server["kv_pages_used"] == 0
            assert server["in_flight"] == 0 and server["requests_served"] % 1000 == 0
            rss.append(_rss_mb(srv.pid))
        assert rss[1] < rss[0] * 1.1 + 20, rss  # the second thousand left nothing behind
    assert re.search(r"Server stopped after serving 2000 request", srv.logs())


def _rss_mb(pid: int) -> float:
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
