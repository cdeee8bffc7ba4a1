"""The notebook launcher and the server's lifecycle, with real subprocesses: `labkit serve` on
the default model, the seed's curl command, graceful SIGTERM/SIGINT, crashes, timeouts, and no
orphan left behind when the launching process dies."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from labkit.serve.launcher import ServerProcess, ServerStartError, launch, launch_many

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # local: no proxy
SEED_FIELDS = {"generated_text", "prompt", "tokens_generated", "inference_time_ms", "gpu_name",
               "gpu_memory_used_gb"}


def stub_command(delay: float = 0.0, watch_parent: bool = True) -> list[str]:
    return [sys.executable, str(TESTS_DIR / "stub_server.py"), "--delay", str(delay),
            *(["--watch-parent"] if watch_parent else [])]


def call(url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with DIRECT.open(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def server_stats(srv: ServerProcess) -> dict:
    return call(srv.url + "/stats")[1]["server"]


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    """Running and not a zombie (an orphan's zombie may linger under a container's init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# --- the real `labkit serve`, default model --------------------------------------------------

@pytest.fixture(scope="module")
def real_server():
    with launch(model="model", max_tokens_limit=256) as srv:
        yield srv
    assert srv.process.returncode == 0, srv.logs(tail=20)  # SIGTERM -> graceful exit
    assert "Server stopped" in srv.logs()


def test_launch_starts_labkit_serve_on_a_free_port_with_the_model_loaded(real_server):
    srv = real_server
    assert srv.running() and srv.url.startswith("http://127.0.0.1:")
    assert call(srv.url + "/") == (200, {"status": "ok", "model_loaded": True})
    logs = srv.logs()
    for line in ("Serving on http://127.0.0.1:", "Loading model from", "No GPU detected",
                 "Model loaded successfully!", "Ready: POST"):
        assert line in logs, line
    assert logs.index("Serving on") < logs.index("Model loaded successfully!")  # listens first
    status, body = call(srv.url + "/generate", {"prompt": "Suggest a skincare routine",
                                                "max_tokens": 8})
    assert status == 200 and body["device"] == "cpu" and body["gpu_name"] is None
    assert body["model"] == "embedded (model/)" and body["synthetic"] is False
    # the access log line reaches us through the pipe's reader thread, after the response
    wait_until(lambda: "POST /generate 200" in srv.logs(tail=5), what="the access log line")
    assert f"pid {srv.pid} running" in repr(srv)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_seeds_curl_command_works_unchanged(real_server):
    host_port = real_server.url.removeprefix("http://")
    command = (f"curl -s -X POST http://{host_port}/generate "
               "-H \"Content-Type: application/json\" "
               "-d '{\"prompt\": \"Suggest a skincare routine\", \"max_tokens\": 150}'")
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert SEED_FIELDS <= set(body)
    assert body["prompt"] == "Suggest a skincare routine"
    assert 1 <= body["tokens_generated"] <= 150 and body["generated_text"]
    health = subprocess.run(f"curl -s http://{host_port}/", shell=True, capture_output=True,
                            text=True, timeout=30)
    assert json.loads(health.stdout) == {"status": "ok", "model_loaded": True}


def test_launch_raises_with_the_log_tail_when_the_server_crashes():
    with pytest.raises(ServerStartError) as caught:
        with launch(model="no-such-model-dir", timeout=120):
            pass
    message = str(caught.value)
    assert "exited with status 1" in message
    assert "Unknown model source 'no-such-model-dir'" in message  # the server's own words
    assert "last lines of the server log" in message


def test_launch_times_out_stops_the_server_and_shows_its_log():
    srv = ServerProcess("model")
    srv.start()
    with pytest.raises(ServerStartError, match="not ready after 0 s"):
        srv.wait_ready(timeout=0.3)
    assert not srv.running()


# --- lifecycle with the stub model (deterministic timing) -----------------------------------

def test_sigterm_stops_gracefully_in_flight_requests_finish_new_ones_get_503():
    srv = ServerProcess("stub", command=stub_command(delay=1.0)).start().wait_ready(60)
    try:
        generate = srv.url + "/generate"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(call, generate, {"prompt": "running", "max_tokens": 3})
            wait_until(lambda: server_stats(srv)["in_flight"] == 1, what="in flight")
            queued = pool.submit(call, generate, {"prompt": "queued", "max_tokens": 3})
            wait_until(lambda: server_stats(srv)["queue_depth"] == 1, what="queued")
            srv.process.send_signal(signal.SIGTERM)
            wait_until(lambda: server_stats(srv)["shutting_down"], what="shutdown")
            status, body = call(generate, {"prompt": "late", "max_tokens": 3})
            assert status == 503 and "shutting down" in body["error"]
            assert call(srv.url + "/health")[0] == 503
            assert running.result(timeout=10)[0] == 200
            assert queued.result(timeout=10)[0] == 200
        assert srv.process.wait(timeout=15) == 0
    finally:
        srv.stop()
    logs = srv.logs()
    assert "Shutting down (SIGTERM)" in logs and "1 queued + 1 running" in logs
    assert "Server stopped after serving 2 request(s)" in logs


def test_sigint_drains_too_and_a_second_signal_stops_at_once():
    srv = ServerProcess("stub", command=stub_command(delay=30.0)).start().wait_ready(60)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(call, srv.url + "/generate", {"prompt": "slow"}, 60)
            wait_until(lambda: server_stats(srv)["in_flight"] == 1, what="in flight")
            srv.process.send_signal(signal.SIGINT)  # Ctrl-C: drain, like SIGTERM
            wait_until(lambda: server_stats(srv)["shutting_down"], what="shutdown")
            assert srv.running()  # still finishing the 30 s request
            started = time.monotonic()
            srv.process.send_signal(signal.SIGTERM)
            assert srv.process.wait(timeout=10) == 1
            assert time.monotonic() - started < 5
            with pytest.raises(OSError):  # the abandoned client sees its connection drop
                pending.result(timeout=10)
    finally:
        srv.stop()
    assert "Shutting down (SIGINT)" in srv.logs() and "stopping now" in srv.logs()


PARENT_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from labkit.serve.launcher import ServerProcess
    srv = ServerProcess("stub", command={command!r}).start().wait_ready(60)
    print(srv.pid, flush=True)
    if sys.argv[1] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no context exit: only the pipe tells
    sys.exit(0)  # a normal exit that forgot to stop it (a kernel shutdown): atexit does
""")


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_no_orphan_when_the_launching_process_ends(how):
    # Without --watch-parent only atexit can stop the server on a normal exit.
    script = PARENT_SCRIPT.format(command=stub_command(watch_parent=how == "kill"))
    parent = subprocess.run([sys.executable, "-c", script, how], capture_output=True,
                            text=True, timeout=90, cwd=REPO)
    assert parent.returncode == (-signal.SIGKILL if how == "kill" else 0), parent.stderr
    pid = int(parent.stdout.split()[0])
    wait_until(lambda: not alive(pid), timeout=15, what=f"server {pid} to exit")


def test_launch_many_side_by_side_each_stopped_once_and_gracefully():
    with launch_many(2, "stub", command=stub_command(delay=0.5), timeout=60) as servers:
        assert len({srv.url for srv in servers}) == 2  # each picked its own free port
        for srv in servers:
            assert call(srv.url + "/generate", {"prompt": "hi", "max_tokens": 2})[0] == 200
        pool = concurrent.futures.ThreadPoolExecutor(2)
        # a request still running when the block ends must finish: one SIGTERM each, not two
        pending = [pool.submit(call, srv.url + "/generate", {"prompt": "last"}) for srv in servers]
        for srv in servers:
            wait_until(lambda srv=srv: server_stats(srv)["in_flight"] == 1, what="in flight")
    assert [future.result(timeout=10)[0] for future in pending] == [200, 200]
    pool.shutdown()
    assert not any(srv.running() or alive(srv.pid) for srv in servers)
    assert [srv.process.returncode for srv in servers] == [0, 0]
    assert [srv.stop() for srv in servers] == [0, 0]  # stopping again is harmless
    assert all("stopping now" not in srv.logs() for srv in servers)


def test_the_logged_url_brackets_an_ipv6_address():
    from labkit.serve.lifecycle import server_url

    assert server_url("127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert server_url("::", 8000) == "http://[::]:8000"
    assert server_url("::1", 0) == "http://[::1]:0"
    assert server_url("localhost", 80) == "http://localhost:80"
