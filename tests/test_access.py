"""Who may use the server and how much one client may hold (`labkit.serve.access`): an API key
that the official openai SDK and `labkit loadtest` send, the probes left open, a Host allow-list
against DNS rebinding, and limits on slow and idle clients and on open connections."""

from __future__ import annotations

import json
import socket
import time

import pytest
from stub_backend import StubBackend
from threaded_server import serving

from labkit.measure import loadtest
from labkit.serve import access
from labkit.serve.http import STATE, create_app

openai = pytest.importorskip("openai")

KEY = "sk-test-7f3a9c"
BEARER = {"Authorization": f"Bearer {KEY}"}


def get(server, path: str, headers: dict | None = None) -> tuple[int, object]:
    server.conn.request("GET", path, headers=headers or {})
    response = server.conn.getresponse()
    data = response.read()
    is_json = response.headers.get_content_type() == "application/json"
    return response.status, json.loads(data) if is_json else data


@pytest.fixture(scope="module")
def locked():
    with serving(create_app(StubBackend, api_key=KEY)) as server:
        yield server


def test_with_an_api_key_only_the_probes_are_open(locked):
    for path in ("/", "/health"):
        assert get(locked, path)[0] == 200
    for path in ("/stats", "/metrics", "/v1/models"):
        status, body = get(locked, path)
        assert status == 401, path
        assert get(locked, path, BEARER)[0] == 200
        assert get(locked, path, {"Authorization": f"Bearer {KEY}x"})[0] == 401
    status, data = locked.post("/generate", b'{"prompt": "hi", "max_tokens": 2}')
    assert status == 401 and "Authorization: Bearer" in json.loads(data)["error"]
    assert KEY not in data.decode()
    status, data = locked.post("/v1/completions", b'{"prompt": "hi"}',
                               headers={"Authorization": "Bearer nope"})
    error = json.loads(data)["error"]
    assert status == 401 and error["code"] == "invalid_api_key" and error["type"] == \
        "invalid_request_error"
    status, data = locked.post("/generate", b'{"prompt": "hi", "max_tokens": 2}', headers=BEARER)
    assert status == 200


def test_the_openai_sdk_works_with_the_key_and_gets_401_without(locked):
    base = f"http://127.0.0.1:{locked.port}/v1"
    sdk = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    assert sdk.completions.create(model="stub", prompt="hi", max_tokens=3).usage \
        .completion_tokens == 3
    chunks = list(sdk.chat.completions.create(
        model="stub", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize("api", ["openai", "generate"])
def test_labkit_loadtest_sends_the_key_from_the_environment(locked, api, monkeypatch):
    url = f"http://127.0.0.1:{locked.port}"
    monkeypatch.delenv("LABKIT_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    result = loadtest.run(url, concurrency=2, requests=4, max_tokens=3, api=api, progress=False)
    assert result.summary()["successful"] == 4
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("LABKIT_API_KEY", KEY)  # the server's variable works for clients too
    assert loadtest.run(url, concurrency=1, requests=1, max_tokens=2, api=api,
                        progress=False).summary()["successful"] == 1
    monkeypatch.delenv("LABKIT_API_KEY")
    if api == "openai":
        with pytest.raises(ValueError, match="OPENAI_API_KEY"):
            loadtest.run(url, concurrency=1, requests=1, max_tokens=2, api=api, progress=False)
    else:
        failed = loadtest.run(url, concurrency=1, requests=1, max_tokens=2, api=api,
                              progress=False)
        assert failed.summary()["failed"] == 1 and "401" in json.dumps(failed.summary())


def test_a_loopback_server_answers_only_loopback_host_names():
    hosts = access.allowed_hosts("127.0.0.1", ["lab.internal"])
    with serving(create_app(StubBackend, allowed_hosts=hosts)) as server:
        for host in ("127.0.0.1", f"127.0.0.1:{server.port}", f"localhost:{server.port}",
                     f"[::1]:{server.port}", "LAB.internal:80"):
            assert get(server, "/stats", {"Host": host})[0] == 200, host
        status, body = get(server, "/", {"Host": f"rebound.example.com:{server.port}"})
        assert status == 400 and "--allowed-host" in body["error"]
        status, data = server.post("/generate", b'{"prompt": "hi"}',
                                   headers={"Host": "evil.example"})
        assert status == 400
    assert access.allowed_hosts("0.0.0.0") is None  # a container's bind: any Host
    assert access.allowed_hosts("0.0.0.0", ["api.example"]) == {"api.example"}


def test_a_body_that_never_arrives_gets_408_and_slow_headers_are_cut_off():
    app = create_app(StubBackend, body_timeout_s=0.3)
    with serving(app, keepalive_timeout=0.5) as server:
        slow_body = _connect(server)
        slow_body.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                          b"application/json\r\nContent-Length: 100\r\n\r\n{\"prompt\"")
        began = time.perf_counter()
        reply = slow_body.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.perf_counter() - began < 2
        slow_headers = _connect(server)
        slow_headers.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never ends
        began = time.perf_counter()
        assert slow_headers.recv(4096) == b""  # closed by the server
        assert time.perf_counter() - began < 3
        assert app[STATE].counters()["requests_rejected"] == 1  # the 408


def test_connections_over_the_cap_get_503_and_the_rest_keep_working():
    with serving(create_app(StubBackend)) as server:
        access.cap_connections(server.server.runner.server, 3)  # ours (keep-alive) + 2
        held = [_connect(server) for _ in range(2)]
        time.sleep(0.1)
        refused = _connect(server)
        reply = refused.recv(4096)
        assert reply.startswith(b"HTTP/1.1 503") and b"Too many connections" in reply
        assert server.get("/")["status"] == "ok"  # the connections inside the cap still work
        held[0].close()
        time.sleep(0.2)
        again = _connect(server)
        again.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert again.recv(4096).startswith(b"HTTP/1.1 200")


def _connect(server) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    return conn
