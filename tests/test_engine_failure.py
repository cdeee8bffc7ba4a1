"""`labkit serve --mode continuous` when the engine cannot answer, on the CPU with the embedded
model and a real engine process: a request that could never fit the KV cache is refused at once
(it used to wait for another request to make the engine step), a chat request without
max_tokens gets what fits, and an engine that dies (kill -9) or wedges (SIGSTOP) turns `/` and
`/health` to 503 within a second or so, fails its requests, and the server exits with status 3,
at once on SIGTERM (it used to drain for --drain-timeout) or by itself shortly after."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import time
from urllib.parse import urlsplit

import pytest

from labkit.serve import client
from labkit.serve.launcher import ServerProcess, launch

pytestmark = pytest.mark.slow
SERVER = dict(mode="continuous", warmup=0, threads=1, device="cpu")
CHAT = {"messages": [{"role": "user", "content": "Suggest a skincare routine"}]}
LONG_STREAM = {"prompt": "Suggest a skincare routine", "max_tokens": 1000, "ignore_eos": True,
               "stream": True}


def test_a_request_that_never_fits_is_refused_at_once_and_chat_gets_what_fits():
    with launch(**SERVER, extra_args=["--kv-cache-gb", "0.001"]) as srv:  # 304 tokens
        began = time.perf_counter()
        chat = client.post(srv.url + "/v1/chat/completions", CHAT, timeout=60)
        assert chat.status == 200, chat
        usage = chat.body["usage"]
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= 304
        assert time.perf_counter() - began < 30

        for path, body, param in [
            ("/v1/completions", {"prompt": "hi", "max_tokens": 1000}, "prompt"),
            ("/v1/chat/completions", {**CHAT, "max_tokens": 1000}, "messages"),
        ]:
            began = time.perf_counter()
            refused = client.post(srv.url + path, body, timeout=10)
            assert time.perf_counter() - began < 2, "refused only when something else stepped"
            assert refused.status == 413
            error = refused.body["error"]
            assert error["param"] == param and error["code"] == "context_length_exceeded"
            assert "KV cache" in error["message"]
        refused = client.post(srv.url + "/generate", {"prompt": "hi", "max_tokens": 1000})
        assert refused.status == 413 and "KV cache" in refused.body["error"]
        server = client.get(srv.url + "/stats").body["server"]
        assert server["running"] == 0 and server["waiting"] == 0
        assert server["requests_rejected"] == 3 and server["requests_served"] == 1


def test_a_killed_engine_shows_at_once_fails_its_stream_and_sigterm_exits_with_3():
    srv = ServerProcess(**SERVER, extra_args=["--failure-exit-delay", "-1"]).start()
    try:
        srv.wait_ready(120)
        stream = _open_stream(srv.url)
        os.kill(_engine_pid(srv), signal.SIGKILL)  # as the kernel's OOM killer would
        killed = time.perf_counter()
        health = _wait_status(srv.url + "/health", 503, timeout=2)
        assert "engine process exited" in health.body["error"]
        root = client.get(srv.url + "/")
        assert root.status == 503 and root.body["model_loaded"] is False
        rest = stream.read().decode()
        assert '"code":"engine_failed"' in rest.replace(" ", "") or "engine process" in rest
        assert rest.rstrip().endswith("data: [DONE]")
        assert time.perf_counter() - killed < 5
        refused = client.post(srv.url + "/generate", {"prompt": "hi", "max_tokens": 5})
        assert refused.status == 503 and "Restart the server" in refused.body["error"]
        stats = client.get(srv.url + "/stats").body["server"]
        assert stats["engine_failure"] and stats["running"] == 0 and stats["kv_pages_used"] == 0
        began = time.perf_counter()
        srv.terminate()
        assert srv.process.wait(10) == 3
        assert time.perf_counter() - began < 5, "SIGTERM waited for the drain timeout"
    finally:
        srv.stop()


def test_a_wedged_engine_is_killed_after_the_step_timeout_and_the_server_exits_by_itself():
    srv = ServerProcess(**SERVER, extra_args=["--engine-step-timeout", "1",
                                              "--failure-exit-delay", "1"]).start()
    try:
        srv.wait_ready(120)
        stream = _open_stream(srv.url)
        os.kill(_engine_pid(srv), signal.SIGSTOP)  # alive, but it never finishes its step
        health = _wait_status(srv.url + "/health", 503, timeout=4)
        assert "wedged" in health.body["error"]
        assert "wedged" in stream.read().decode()  # its request failed, not left waiting
        assert srv.process.wait(10) == 3
        assert "stopping in 1 s" in srv.logs()
    finally:
        srv.stop()


def test_an_engine_wedged_at_rest_is_caught_by_the_first_request_it_never_answers():
    """Frozen while idle, the engine never says it is busy: the clock starts when a request is
    sent to it, so the request fails and /health turns 503 after the step timeout, instead of
    the request hanging forever behind a healthy-looking server."""
    import concurrent.futures

    srv = ServerProcess(**SERVER, extra_args=["--engine-step-timeout", "1",
                                              "--failure-exit-delay", "1"]).start()
    try:
        srv.wait_ready(120)
        os.kill(_engine_pid(srv), signal.SIGSTOP)
        assert client.get(srv.url + "/health").status == 200  # at rest: nothing to notice
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            asked = pool.submit(client.post, srv.url + "/generate",
                                {"prompt": "hi", "max_tokens": 5}, timeout=15)
            health = _wait_status(srv.url + "/health", 503, timeout=5)
            assert "wedged" in health.body["error"]
            reply = asked.result(timeout=15)
        assert reply.status == 503 and "wedged" in reply.body["error"]
        assert srv.process.wait(10) == 3
    finally:
        srv.stop()


def _open_stream(url: str, max_tokens: int = 1000) -> http.client.HTTPResponse:
    """A long streamed completion, read up to its first token."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/v1/completions", json.dumps({**LONG_STREAM, "max_tokens": max_tokens}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    return response


def _engine_pid(srv: ServerProcess) -> int:
    match = re.search(r"Engine process ready \(pid (\d+)\)", srv.logs())
    assert match, srv.logs(tail=20)
    return int(match.group(1))


def _wait_status(url: str, status: int, timeout: float) -> client.Reply:
    deadline = time.perf_counter() + timeout
    while True:
        reply = client.get(url, timeout=1)
        if reply.status == status or time.perf_counter() > deadline:
            assert reply.status == status, f"{url} still {reply.status} after {timeout} s"
            return reply
        time.sleep(0.05)
